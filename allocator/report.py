"""Printed tables: predicted vs measured bytes of a quantized model, and plan-vs-uniform quality."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from .budget import MIB
from .plan import Plan


def stored_layer_bytes(weights_file: str | Path, plan: Plan) -> dict[str, int]:
    """Bytes each quantized layer's weight tensors (not its bias) occupy in a safetensors file."""
    sizes = {layer.name: 0 for layer in plan.layers}
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():
            module, _, tensor = key.rpartition(".")
            if module in sizes and tensor != "bias":
                t = f.get_slice(key)
                shape = t.get_shape()
                n = 1
                for d in shape:
                    n *= d
                sizes[module] += n * _itemsize(t.get_dtype())
    return sizes


def _itemsize(dtype: str) -> int:
    return {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}[dtype]


def print_plan_check(plan: Plan, in_memory: dict[str, int], out_dir: str | Path | None = None) -> None:
    """Print predicted vs measured bytes of the quantized layers (in memory and, if saved, on disk)."""
    predicted = sum(layer.bytes for layer in plan.layers)
    measured = sum(in_memory.values())
    line = f"quantized layers: predicted {predicted:,} B, in memory {measured:,} B"
    if out_dir is not None:
        on_disk = sum(stored_layer_bytes(Path(out_dir) / "model.safetensors", plan).values())
        line += f", on disk {on_disk:,} B"
    print(line + (" (match)" if measured == predicted else " (MISMATCH)"))


def print_quality(model, qmodel, batches: list, where: str) -> None:
    """Print the float and the quantized model's loss (and perplexity / accuracy) on labelled batches."""
    from .evaluate import evaluate

    rows = [{"model": name, **evaluate(m, batches)} for name, m in (("float", model), ("quantized", qmodel))]
    columns = [("model", where, "s"), ("loss", "loss", ".4f"), ("perplexity", "perplexity", ".4f")]
    if "accuracy" in rows[0]:
        columns.append(("accuracy", "accuracy", ".4f"))
    print(format_table(rows, columns))


def has_labels(batches: list) -> bool:
    """Whether every batch is a dict carrying "labels" (what evaluate needs)."""
    return all(isinstance(b, dict) and "labels" in b for b in batches)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain text table; columns are (key, header, format spec)."""
    cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def mib(nbytes: float) -> float:
    return nbytes / MIB
