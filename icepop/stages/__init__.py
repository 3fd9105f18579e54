"""The stages: SFT and RLVR loops over the Ray worker groups."""
