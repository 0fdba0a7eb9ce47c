"""One module per wire protocol: native, OpenAI-compatible, KServe v2."""
