"""Names a command line can offer without importing torch (the modules that use them do)."""

# last-block attention of the dense (per-patch) features: backbones/dense.py
ATTENTIONS = ("csa", "vanilla", "clearclip", "naclip", "maskclip")
# how the position embedding meets an input of another size: backbones/dense.py
POSITION_RULES = ("exact", "sclip")
