"""TRUSTED: confidential inference, on the enclave's side of the boundary.

The model's weights (plain, or a sealed model released only to an attested enclave) and every
query stay here; the workers see only blinded products, as in training. The protected model in
``eval()`` under ``torch.no_grad()`` is the whole mechanism: these modules load models, read and
prepare inputs (:mod:`.inputs`), run batches (:mod:`.predictor`) and serve them over HTTP
(:mod:`.server`).
"""
