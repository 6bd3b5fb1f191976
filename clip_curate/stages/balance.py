"""Stage ``balance``: concept balancing after MetaCLIP (Xu et al., "Demystifying CLIP Data", 2023).

The idea (not MetaCLIP's code or metadata): match every caption against a list of entries (concepts);
count the matches of each entry over the whole input; cap each entry at about ``t`` rows. A row that
matches entries e₁…eₖ is kept with probability 1 − ∏(1 − pᵢ), pᵢ = min(1, t / countᵢ): rows of tail
entries (count ≤ t) are always kept, head entries are sampled down to about t.

* **Matching** is whole-word: captions and entries are lower-cased and split into words with punctuation
  split off, then padded with spaces, so ``dog`` does not match ``hotdog`` and ``red car`` matches only the
  two words together. One Aho-Corasick automaton (pyahocorasick) matches all entries in one pass.
* **Counting** is one Beam combine over the whole input; the per-entry keep probabilities reach the
  draw as a side input (only entries over ``t`` are carried: the rest keep p = 1).
* **The draw** is deterministic: entry i keeps the row when hash(uid, entryᵢ, ``--seed``) < pᵢ, so the
  same input keeps the same uids on every run, runner and worker count.

Rejections: ``balance/no_entry`` (the caption matches no entry) and ``balance/over_represented`` (the
draw dropped it; ``detail`` names its most frequent matched entry). Kept rows gain ``balance_entries``.
stats.json gains ``balance``: entries matched, entries at or under t, and the top entries' counts before
and after.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import apache_beam as beam
from apache_beam.utils import shared

from clip_curate import records
from clip_curate.fields import ConfigError, opt, read_user_text
from clip_curate.stages.base import CounterSumFn, RowFilter, Stage, StageContext, Verdict, register

log = logging.getLogger(__name__)

STAGE = "balance"
TOP_ENTRIES = 50  # entries listed in stats.json (before and after)
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class BalanceConfig:
    """Concept balancing (MetaCLIP's algorithm): cap each entry at about t rows."""

    balance_entries: Optional[str] = opt(None, "entry list that turns balancing on: UTF-8 text, one entry per "
                                               "line ('#' comments), or MetaCLIP's metadata.json (a JSON list); "
                                               "any fsspec path")
    balance_t: int = opt(20_000, "keep about this many rows per entry (MetaCLIP's t); rows of entries matched "
                                 "t times or fewer are all kept")
    seed: int = opt(0, "seed of the balancing draw: the same input and seed keep the same uids")

    def __post_init__(self):
        if not isinstance(self.balance_t, int) or self.balance_t < 1:
            raise ConfigError(f"--balance-t must be an integer >= 1, got {self.balance_t!r}")


# ---------------------------------------------------------------------------------------------
# Matching (pure)

def normalize(text: Optional[str]) -> str:
    """Lower-case words with punctuation split off, space-separated and space-padded: `` a hot - dog ``."""
    words = _WORD.findall((text or "").lower())
    return " " + " ".join(words) + " " if words else " "


def parse_entries(text: str, source: str = "<entries>") -> tuple[str, ...]:
    """Entries of a file: MetaCLIP's JSON list, or one entry per line ('#' starts a comment)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--balance-entries {source}: not a valid JSON list ({exc.msg} at line "
                              f"{exc.lineno})") from None
        if not all(isinstance(e, str) for e in items):
            raise ConfigError(f"--balance-entries {source}: the JSON list must hold strings only")
    else:
        items = [line.split("#", 1)[0] for line in text.splitlines()]
    out = tuple(dict.fromkeys(e.strip() for e in items if normalize(e).strip()))
    if not out:
        raise ConfigError(f"--balance-entries {source}: no entries (one per line, or a JSON list of strings)")
    return out


def load_entries(path: str) -> tuple[str, ...]:
    return parse_entries(read_user_text(path, "--balance-entries"), path)


class EntryMatcher:
    """Whole-word matching of many entries at once (one Aho-Corasick automaton)."""

    def __init__(self, entries: Sequence[str]):
        import ahocorasick

        self.entries = tuple(entries)
        self._automaton = ahocorasick.Automaton()
        for i, entry in enumerate(self.entries):
            key = normalize(entry)
            if key.strip() and key not in self._automaton:
                self._automaton.add_word(key, i)
        self._automaton.make_automaton()

    def match(self, caption: Optional[str]) -> list[str]:
        """The entries found in ``caption`` as whole words, in entry-list order, each once."""
        text = normalize(caption)
        if len(text) < 3 or len(self._automaton) == 0:
            return []
        found = {i for _, i in self._automaton.iter(text)}
        return [self.entries[i] for i in sorted(found)]


def keep_probabilities(counts: dict[str, int], t: int) -> dict[str, float]:
    """p = t / count for entries matched more than t times (the others keep p = 1 and are left out)."""
    return {e: t / n for e, n in counts.items() if n > t}


def draw(uid: str, entry: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (uid, entry, seed)."""
    digest = hashlib.blake2b(f"{seed}\x00{uid}\x00{entry}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def decide(uid: str, matched: Sequence[str], probabilities: dict[str, float], counts: dict[str, int],
           seed: int, t: int) -> tuple[Optional[str], str]:
    """``(reason or None, detail)``: kept when some matched entry's draw falls under its probability
    (P = 1 − ∏(1 − pᵢ))."""
    if not matched:
        return "no_entry", "the caption matches no entry"
    if any(draw(uid, e, seed) < probabilities.get(e, 1.0) for e in matched):
        return None, ""
    top = max(matched, key=lambda e: (counts.get(e, 0), e))
    return "over_represented", f"entry={top!r} matched {counts.get(top, 0)} rows > t={t}"


# ---------------------------------------------------------------------------------------------
# Beam

class _Matchers:
    """One matcher per process per entry file (Beam's Shared), so 500k entries load once per worker."""

    _shared = shared.Shared()

    @classmethod
    def get(cls, path: str) -> EntryMatcher:
        class _Box:  # Shared holds objects that can be weakly referenced
            def __init__(self, matcher):
                self.matcher = matcher

        return cls._shared.acquire(lambda: _Box(EntryMatcher(load_entries(path))), tag=path).matcher


class _Match(beam.DoFn):
    def __init__(self, path: str):
        self._path = path

    def setup(self):
        self._matcher = _Matchers.get(self._path)

    def process(self, row):
        yield {**row, "balance_entries": self._matcher.match(row.get("caption"))}


class _Draw(RowFilter):
    stage = STAGE

    def judge(self, row, probabilities, counts):
        matched = row.get("balance_entries") or []
        reason, detail = decide(str(row["uid"]), matched, probabilities, counts, self.config.seed,
                                self.config.balance_t)
        return Verdict(row if matched else {k: v for k, v in row.items() if k != "balance_entries"}, reason, detail)


def balance_summary(before: dict[str, int], after: dict[str, int], t: int, top: int = TOP_ENTRIES) -> dict[str, Any]:
    """stats.json's ``balance``: how many entries matched, how many are at or under t, the top entries."""
    ranked = sorted(before.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"t": t, "entries_matched": len(before), "entries_at_or_under_t": sum(1 for n in before.values() if n <= t),
            "top_entries": [{"entry": e, "before": n, "after": after.get(e, 0)} for e, n in ranked]}


def _write_summary(_, out_dir: str, before: dict, after: dict, t: int) -> None:
    from apache_beam.io.filesystems import FileSystems

    path = FileSystems.join(out_dir.rstrip("/"), "_stage_stats", f"{STAGE}.json")
    with FileSystems.create(path) as f:
        f.write(json.dumps(balance_summary(before, after, t), sort_keys=True).encode())


class Balance(beam.PTransform):
    """rows -> (kept, rejected) under MetaCLIP-style balancing (see the module docstring). With
    ``stats_dir``, the entry counts before and after are written for stats.json."""

    def __init__(self, config: BalanceConfig, stats_dir: Optional[str] = None):
        super().__init__()
        if not config.balance_entries:
            raise ConfigError("the balance stage needs --balance-entries FILE (one entry per line)")
        self._cfg = config
        self._stats_dir = stats_dir

    def expand(self, rows):
        cfg = self._cfg
        matched = rows | "MatchEntries" >> beam.ParDo(_Match(cfg.balance_entries))
        counts = (matched | "Entries" >> beam.Map(lambda r: r["balance_entries"])
                  | "CountEntries" >> beam.CombineGlobally(CounterSumFn()))
        probs = counts | "KeepProbabilities" >> beam.Map(keep_probabilities, cfg.balance_t)
        out = matched | "Draw" >> beam.ParDo(_Draw(cfg), beam.pvalue.AsSingleton(probs),
                                             beam.pvalue.AsSingleton(counts)).with_outputs(records.REJECTED_TAG,
                                                                                            main="kept")
        if self._stats_dir:
            after = (out.kept | "KeptEntries" >> beam.Map(lambda r: r["balance_entries"])
                     | "CountKept" >> beam.CombineGlobally(CounterSumFn()))
            (rows.pipeline | "Once" >> beam.Create([None])
             | "WriteBalanceStats" >> beam.Map(_write_summary, self._stats_dir, beam.pvalue.AsSingleton(counts),
                                               beam.pvalue.AsSingleton(after), cfg.balance_t))
        return out.kept, out[records.REJECTED_TAG]


def _check(cfg: BalanceConfig) -> None:
    if cfg.balance_entries:
        EntryMatcher(load_entries(cfg.balance_entries))  # a bad file fails now, with the flag named


def _check_passes(cfg: BalanceConfig, run_config) -> None:
    if cfg.balance_entries:
        raise ConfigError("balancing counts every entry over the whole input, so it cannot run in --chunk-rows "
                          "passes: curate in passes without --balance-entries, then balance the output in one job "
                          "(--input OUT --input-format curated --stages balance --balance-entries FILE)")


def _build(cfg: BalanceConfig, ctx: StageContext):
    return Balance(cfg, stats_dir=ctx.output) if cfg.balance_entries else None


register(Stage(STAGE, BalanceConfig, build=_build, position=80, check=_check, check_passes=_check_passes,
               title="concept balancing"))


def entries_from_wordnet(index_noun: str, min_senses: int = 1) -> list[str]:
    """Noun lemmas of a WordNet ``index.noun`` file (Debian's ``wordnet-base``:
    /usr/share/wordnet/index.noun; WordNet licence, permissive), underscores as spaces, in file order."""
    out = []
    with open(index_noun, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip() or line.startswith(" "):  # the licence header lines start with spaces
                continue
            parts = line.split()
            if len(parts) < 3 or parts[1] != "n":
                continue
            if int(parts[2]) >= min_senses:
                out.append(parts[0].replace("_", " "))
    return list(dict.fromkeys(out))



def main(argv: Optional[Sequence[str]] = None) -> int:
    """``clip-curate entries build --wordnet INDEX_NOUN --output FILE``: an entry list for --balance-entries."""
    from clip_curate.fields import OneLineParser

    parser = OneLineParser(prog="clip-curate entries", description="Build an entry list for --balance-entries.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write WordNet's noun lemmas, one per line")
    build.add_argument("--wordnet", default="/usr/share/wordnet/index.noun",
                       help="WordNet index.noun (Debian: apt-get install wordnet-base)")
    build.add_argument("--min-senses", type=int, default=1, help="keep lemmas with at least this many noun senses")
    build.add_argument("--output", required=True, help="entry list to write (one entry per line)")
    args = parser.parse_args(list(argv or []))
    try:
        entries = entries_from_wordnet(args.wordnet, args.min_senses)
    except FileNotFoundError:
        raise ConfigError(f"--wordnet: {args.wordnet} not found; install Debian's wordnet-base or pass the path "
                          "of a WordNet index.noun") from None
    if not entries:
        raise ConfigError(f"--wordnet: {args.wordnet} holds no noun lemmas (is it WordNet's index.noun?)")
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("# WordNet noun lemmas (WordNet licence: https://wordnet.princeton.edu/license-and-commercial-use)\n")
        f.writelines(e + "\n" for e in entries)
    print(f"wrote {len(entries)} entries to {args.output}")
    return 0
