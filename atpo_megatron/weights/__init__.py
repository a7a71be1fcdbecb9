"""Actor weights in Hugging Face form: ``hf_bridge`` (import/export for any TP x PP layout) and
``sync`` (streaming them into a rollout engine)."""
