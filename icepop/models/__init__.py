"""Model definitions icepop builds itself (the tiny offline family)."""
