"""AnchorFormer training framework.

Importing the package is light (no torch): ``import anchorformer.config`` reads recipes anywhere.
``import anchorformer.models`` registers the ``anchorformer_*`` models with timm:

    import anchorformer.models, timm
    model = timm.create_model("anchorformer_tiny_patch16_224", num_classes=10)
"""
__version__ = "0.1.0"
