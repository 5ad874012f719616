"""PGP methods, one module per method (LoRA-PGP in `lora.py`)."""
