"""fxquant's compiler passes (installed as ``fxquant.passes``): one pass per module, each with a contract."""
