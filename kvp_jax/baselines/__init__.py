"""The other ways to cut TTFT, beside KV Prediction: selective recomputation, LazyLLM, random and static pruning."""
