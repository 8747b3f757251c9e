"""LoRA, DoRA and QLoRA (NF4 base) for the transformer in model/, with PEFT-format adapter files.

    layers.py      LoRALinear / DoRALinear wrappers (formulas in the docstrings)
    nf4.py         NF4 quantisation, the PyTorch reference dequantiser, NF4Linear
    nf4_triton.py  the Triton dequantisation kernel (imported only when used)
    inject.py      apply_adapters, adapters_disabled, merge/unmerge, export_merged
    peft_io.py     save_adapter / load_adapter in PEFT's on-disk format
"""
