"""Presets: full fine-tuning under a name with its own defaults (`--method safe`), and "full" itself."""
from .base import Method, preset, register

register("full")(Method)  # the base class, every hook a no-op: plain full fine-tuning

preset("replay", Method, "Experience replay: full fine-tuning on the domain set mixed with general examples "
                         "(int(len(domain) * replay_fraction) of them).", replay_fraction=0.15)
preset("safe", Method, "Full fine-tuning with conservative settings: small lr, warmup, cosine decay, effective "
                       "batch 16.", lr=2e-5, epochs=3, batch_size=4, grad_accum=4, warmup=0.05, schedule="cosine",
       weight_decay=0.01)
preset("risky", Method, "Full fine-tuning with aggressive settings: 2.5x the lr, many epochs, batch 1, no warmup.",
       lr=5e-5, epochs=10, batch_size=1, grad_accum=1, warmup=0.0, schedule="linear", weight_decay=0.0)
