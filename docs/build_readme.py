"""Assemble README.md from docs/readme/*.md and the declared schemas/configs: python docs/build_readme.py"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from clip_curate import records  # noqa: E402
from clip_curate.docgen import flags_table, schema_table  # noqa: E402

ORDER = ["_intro", "usage", "download", "image", "clip", "tiny-model", "dedup", "safety-audit", "pools",
         "evaluate", "distributed", "reference", "benchmarks", "limitations", "development"]


def main() -> None:
    parts = []
    for name in ORDER:
        path = os.path.join(HERE, "readme", f"{name}.md")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read().replace("<!-- sections merged from docs/readme/*.md follow -->\n", "")
        reasons = "\n".join(f"| `{s}` | {', '.join(f'`{r}`' for r in rs)} |" for s, rs in records.REASONS.items())
        text = (text.replace("REASONS_TABLE", reasons).replace("FLAGS_TABLE", flags_table())
                .replace("CURATED_TABLE", schema_table("curated_row"))
                .replace("REJECTED_TABLE", schema_table("rejected_row")))
        parts.append(text.strip() + "\n")
    with open(os.path.join(os.path.dirname(HERE), "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    main()
