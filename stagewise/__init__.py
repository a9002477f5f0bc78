"""stagewise: stage-resolved inference of multimodal LLMs on event streams and video.

Every sample goes through five timed stages -- 1 load, 2 preprocess, 3 vision,
4 prefill, 5 decode -- and the run records, per sample, where each millisecond went.
"""

__version__ = "0.1.0"

STAGES: tuple[str, ...] = ("load", "preprocess", "vision", "prefill", "decode")
"""The five stages, in pipeline order. Record fields are ``f"{stage}_ms"``."""
