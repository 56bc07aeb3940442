"""Training losses, one module per method family (``preference``: DPO, IPO, ORPO, KTO, SimPO)."""
