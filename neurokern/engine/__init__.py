"""Whole-model merges streamed from disk to disk: sources (lazy safetensors reading; files: weight
files and headers, without torch), plan (shards, work units, memory estimate), run (the method's
whole-model passes, neurokern.methods.passes, then the merge pass), executor (the read -> H2D ->
kernels -> D2H -> write pipeline), writer (partial output, resume, atomic publish), distributed
(torchrun ranks), prefetch (warm-up reads while the merge starts), settings (the NEUROKERN_*
variables, read once), timing (a Recorder per merge: NEUROKERN_PROFILE, NEUROKERN_TRACE)."""
__all__ = ["EngineSettings", "Result", "merge_models"]


def __getattr__(name: str):
    # Imported when first used: the command line starts its warm-up reads (engine.prefetch)
    # before torch is imported.
    if name in __all__:
        from neurokern.engine import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
