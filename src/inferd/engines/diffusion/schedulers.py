"""Scheduler names, as LocalAI's diffusers backend spells them, -> diffusers scheduler classes.

LocalAI puts the name in ``ModelOptions.SchedulerType`` (its gallery configs say
``scheduler_type: k_dpmpp_2m`` etc.; the list follows A1111's sampler names). A ``k_``
prefix means Karras sigmas. The new scheduler is built from the pipeline's current
scheduler config, so the model's beta schedule and timestep count are kept.
"""

from __future__ import annotations

from typing import Any

# name -> (diffusers class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}
#: Schedulers that accept ``use_karras_sigmas`` (the ``k_`` variants).
KARRAS = frozenset({"lms", "dpm_2", "dpm_2_a", "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde", "heun", "euler"})


def scheduler_names() -> list[str]:
    return sorted([*SCHEDULERS, *(f"k_{n}" for n in KARRAS)])


def make_scheduler(name: str, current_config: Any) -> Any:
    """A scheduler called ``name`` configured like ``current_config``; ValueError names the choices."""
    import diffusers

    key = name.strip().lower()
    karras = key.startswith("k_") and key[2:] in KARRAS
    base = key[2:] if karras else key
    if base not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(scheduler_names())}")
    class_name, extra = SCHEDULERS[base]
    config = {**dict(current_config), **extra}
    if karras:
        config["use_karras_sigmas"] = True
    return getattr(diffusers, class_name).from_config(config)
