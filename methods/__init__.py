"""Forgetting mitigations: the plug-in contract (base.py) and one file per built-in.

    from methods import Method, option, register       # what a plug-in needs (examples/l1_init.py)

base.py documents every hook and the order train.py calls them in. Importing this package registers the
built-ins, in the order `train.py --help` lists them.
"""
from .base import (REGISTRY, Method, RunContext, check_all, flag_name, get_method, get_method_class,  # noqa: F401
                   load_method_file, make_options, option, option_keys, option_type, parse_floats, preset, register)
from . import presets, lora, ewc, l2_init, freeze, wise_ft, mofo, kl, ewc_lora, self_replay  # noqa: F401,E402
from . import ties, dare, agem  # noqa: F401,E402  (merging.py: the task-vector merges)
from . import sdft_rewrite, sdft_on_policy  # noqa: F401,E402  (self_distillation.py: what they share)
from . import olora, online_ewc  # noqa: F401,E402  (task-stream methods: base.py, "Task streams")
