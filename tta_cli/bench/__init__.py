"""The wild-setting benchmark: ImageNet-C style corruption (``tta corrupt``), the SAR paper's
streams per setting, runs of every method on a fresh source model, and the report (``tta bench``).

Everything here reuses the library (model loading, methods, the ordered loader and the engine);
the optional extra ``bench`` (corrupt-tta, matplotlib) is only needed for corrupting and plotting.
"""
