"""Generate README reference tables from the declared configs and schemas (``python -m clip_curate.docgen``)."""
from __future__ import annotations

import dataclasses
import sys

from clip_curate import schema
from clip_curate.config import all_config_classes
from clip_curate.options import flag_name


def flags_table() -> str:
    lines = ["| flag | default | stage | meaning |", "|---|---|---|---|"]
    for title, cls in all_config_classes():
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli") is False:
                continue
            default = f.default
            if isinstance(default, tuple):
                default = ",".join(map(str, default)) or "—"
            elif isinstance(default, bool):
                default = "on" if default else "off"
            elif default is None:
                default = "—"
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `{flag_name(f)}` | `{default}` | {title} | {help_text} |")
    return "\n".join(lines)


def schema_table(name: str) -> str:
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for f in schema.load_declaration(name)["fields"]:
        lines.append(f"| `{f['name']}` | {f['type']} | {f.get('description', '')} |")
    return "\n".join(lines)


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "flags"
    print(flags_table() if what == "flags" else schema_table(what))


if __name__ == "__main__":
    main()
