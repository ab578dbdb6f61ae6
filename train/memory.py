"""Per-device memory of a compiled step, from XLA's memory analysis (nothing is allocated)."""

from __future__ import annotations


def memory_report(compiled) -> dict[str, int]:
    """Bytes per device: arguments, outputs, temporaries (activations, gradients, workspace), code,
    and their total less the outputs that reuse donated argument buffers (aliases)."""
    m = compiled.memory_analysis()
    report = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    report["total_bytes"] = (
        report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"] + report["temp_bytes"]
    )
    return report
