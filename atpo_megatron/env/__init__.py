"""The search-agent environment: prompt, search tool, retriever server, reward and QA data.

No model and no torch.distributed here. Modules: ``prompts``, ``search_tool`` (HTTP client),
``retriever`` (the Search-R1 compatible server), ``reward``, ``data``. Import them directly;
this package imports nothing so that ``python -m atpo_megatron.env.retriever`` stays clean.
"""
