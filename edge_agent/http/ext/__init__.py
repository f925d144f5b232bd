"""What the agent serves beyond the KServe V2 core: Triton's model repository (``repository``) and
statistics (``stats``) extensions, and the extra ``/metrics`` series (``nvmetrics``: Triton's
``nv_inference_*``; ``shadow_metrics``: running shadow releases).
"""
