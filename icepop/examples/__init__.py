"""Examples that runs use by dotted path: the calculator agent of README's "Unmodified agents"."""
