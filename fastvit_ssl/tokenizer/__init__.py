"""Visual tokenizers for BEiT: images -> one discrete token per patch (base.py's interface; dalle.py, dvae.py)."""
