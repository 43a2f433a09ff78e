"""A generated, seeded dataset that looks like a server's files, for side-by-side benchmarks.

At scale 1.0 it holds about 1 GiB: tens of thousands of small config-like and source-like
text files in nested directories, compressible log files of a few MiB each, medium files
that are half text and half binary, a few large incompressible files (disk images,
tarballs), a 64 MiB database-like file of 8 KiB pages with repeated structure, symlinks
(relative, absolute, dangling, to directories), hard links, and awkward names (spaces,
unicode, a newline, quotes, bytes that are not UTF-8, names and paths past tar's 100-byte
field). `scale` multiplies every size and count, so `scale=0.1` is a quick ~100 MiB run.

The same (seed, scale) always gives the same tree, bytes, modes and times (`fingerprint`
checks it). `mutate` then changes about `percent`% of the files (modify, add, delete) for
the incremental rounds; it never touches the probe file that one-file restores fetch.

    python -m bench.dataset DIR [--scale 0.1] [--seed 1]       # generate, print a summary
    python -m bench.dataset DIR --mutate 1 --seed 2              # one 1%-change round
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import stat
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

KIB, MIB = 1 << 10, 1 << 20
EPOCH = 1_700_000_000  # file times are EPOCH + a seeded offset: the same on every run
MUTATE_EPOCH = 1_710_000_000
PAGE = 8192
MANIFEST_SUFFIX = ".manifest.json"

_WORD_TEXT = (
    "alpha beta gamma delta api app auth backend cache client cluster config core cron daemon "
    "data db debug deploy disk dns edge engine event export fetch filter gateway grpc handler "
    "health host http index ingest job kafka key lease limit listener load log mail manager "
    "metric mirror monitor mount net node notify object pool port proxy queue quota rate read "
    "record redis region relay replica report request retry route rule scheduler schema secret "
    "server service session shard sink socket source spool stage state storage stream sync "
    "table task tenant thread timer token topic trace user vault volume watch worker write zone"
)
WORDS = _WORD_TEXT.split()
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
SERVICES = ["nginx", "postgres", "api", "worker", "cron", "auth", "mailer", "metrics"]
LEVELS = ["INFO"] * 12 + ["DEBUG"] * 5 + ["WARN"] * 2 + ["ERROR"]


@dataclass
class Manifest:
    """What `generate` made; written next to the tree as `<root>.manifest.json`."""

    seed: int
    scale: float
    root: str
    probe: str  # relative path of the small file that one-file restores fetch
    files: int = 0
    bytes: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    odd_names: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [files, bytes]

    def add(self, kind: str, size: int) -> None:
        files, total = self.by_kind.get(kind, [0, 0])
        self.by_kind[kind] = [files + 1, total + size]
        self.files += 1
        self.bytes += size


def manifest_path(root: Path) -> Path:
    return root.with_name(root.name + MANIFEST_SUFFIX)


def load_manifest(root: Path) -> Manifest:
    return Manifest(**json.loads(manifest_path(root).read_text()))


# -- generation ----------------------------------------------------------------------------


def generate(root: Path, scale: float = 1.0, seed: int = 1) -> Manifest:
    """Create the dataset under `root` (which must not exist yet, or be empty)."""
    root = Path(root).absolute()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; remove it or choose another directory")
    root.mkdir(parents=True, exist_ok=True)
    maker = _Maker(root, scale, seed)
    manifest = maker.run()
    manifest_path(root).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


def _count(base: float, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(base * scale))


class _Maker:
    def __init__(self, root: Path, scale: float, seed: int) -> None:
        self.root = root
        self.scale = scale
        self.seed = seed
        self.times = random.Random(f"{seed}:times")
        self.manifest = Manifest(seed=seed, scale=scale, root=str(root), probe="")
        self.text_files: list[Path] = []

    def rng(self, part: str) -> random.Random:
        """One generator per part, so that changing one part's code leaves the rest alone."""
        return random.Random(f"{self.seed}:{part}")

    def run(self) -> Manifest:
        self.small_files()
        self.logs()
        self.medium_files()
        self.large_files()
        self.database()
        self.odd_names()
        self.hardlinks()
        self.symlinks()
        self.empties()
        self.directory_times()
        return self.manifest

    # -- helpers -------------------------------------------------------------------------

    def write(self, path: Path, data: bytes | list[bytes], kind: str, mode: int = 0o644) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with open(path, "wb") as out:
            for block in [data] if isinstance(data, bytes) else data:
                out.write(block)
                size += len(block)
        os.chmod(path, mode)
        stamp = EPOCH + self.times.randrange(0, 200 * 86400)
        os.utime(path, (stamp, stamp))
        self.manifest.add(kind, size)

    def directories(self, rng: random.Random, top: str, count: int, depth: int) -> list[Path]:
        """`count` nested directories under `top`, each a child of an earlier one."""
        made = [self.root / top]
        for _ in range(count):
            parent = rng.choice(made) if len(made) < 4 or rng.random() < 0.7 else made[-1]
            if len(parent.relative_to(self.root).parts) >= depth:
                parent = self.root / top
            name = "-".join(rng.choices(WORDS, k=rng.choice((1, 1, 2))))
            made.append(parent / name)
        return sorted(set(made))

    # -- parts ---------------------------------------------------------------------------

    def small_files(self) -> None:
        """Config-like and source-like text files, 100 B to ~40 KiB, in nested dirs."""
        rng = self.rng("small")
        count = _count(40_000, self.scale, 50)
        config_lines = _config_lines(rng, 4000)
        source_lines = _source_lines(rng, 8000)
        trees = {
            "etc": self.directories(rng, "etc", _count(300, self.scale, 4), 4),
            "srv": self.directories(rng, "srv", _count(1800, self.scale, 8), 7),
            "home": self.directories(rng, "home", _count(600, self.scale, 4), 6),
        }
        for index in range(count):
            top = rng.choices(("etc", "srv", "home"), weights=(3, 5, 2))[0]
            folder = rng.choice(trees[top])
            size = min(int(rng.lognormvariate(8.3, 1.0)), 60 * KIB)  # median ~4 KiB
            if top == "etc" or (top == "home" and rng.random() < 0.4):
                ext = rng.choice((".conf", ".ini", ".yaml", ".json", ".toml", ""))
                header = f"# {folder.name} settings, generated #{index}\n"
                lines, kind = config_lines, "config"
            else:
                ext = rng.choice((".py", ".py", ".c", ".h", ".js", ".go", ".md"))
                header = f"// {folder.name}/{index}: source file {rng.getrandbits(64):x}\n"
                lines, kind = source_lines, "source"
            name = f"{rng.choice(WORDS)}_{index}{ext}"
            body = _text(rng, lines, size, header)
            mode = (
                0o600 if "secret" in name else 0o755 if ext == "" and rng.random() < 0.3 else 0o644
            )
            path = folder / name
            self.write(path, body, kind, mode)
            self.text_files.append(path)
        probe = self.text_files[len(self.text_files) // 2]
        self.manifest.probe = str(probe.relative_to(self.root))

    def logs(self) -> None:
        """Compressible logs, 2-8 MiB each, some rotated."""
        rng = self.rng("logs")
        for index in range(_count(64, self.scale, 3)):
            service = SERVICES[index % len(SERVICES)]
            rotation = index // len(SERVICES)
            name = f"{service}.log" + (f".{rotation}" if rotation else "")
            size = int(rng.uniform(2, 8) * MIB)
            path = self.root / "var" / "log" / service / name
            self.write(path, _log_blocks(rng, service, size, start=EPOCH + index * 3600), "log")

    def medium_files(self) -> None:
        """Documents and media: 128 KiB-2 MiB, half text and half random bytes."""
        rng = self.rng("medium")
        lines = _source_lines(rng, 2000)
        folders = self.directories(rng, "srv/media", _count(30, self.scale, 2), 4)
        for index in range(_count(160, self.scale, 4)):
            size = int(rng.uniform(128 * KIB, 2 * MIB))
            parts, filled = [], 0
            while filled < size:
                piece = min(size - filled, rng.choice((16, 32, 64)) * KIB)
                if rng.random() < 0.5:
                    parts.append(rng.randbytes(piece))
                else:
                    parts.append(_text(rng, lines, piece, "")[:piece].ljust(piece, b"\n"))
                filled += piece
            ext = rng.choice((".pdf", ".docx", ".png", ".sqlite", ".pack"))
            self.write(rng.choice(folders) / f"{rng.choice(WORDS)}-{index}{ext}", parts, "medium")

    def large_files(self) -> None:
        """Incompressible: three files of 96, 48 and 16 MiB at scale 1 (160 MiB)."""
        rng = self.rng("large")
        for name, size in (("vm-disk.qcow2", 96), ("release.tar.zst", 48), ("keys.bin", 16)):
            total = int(size * MIB * self.scale)
            blocks = [rng.randbytes(min(8 * MIB, total - at)) for at in range(0, total, 8 * MIB)]
            self.write(self.root / "opt" / "images" / name, blocks, "random")

    def database(self) -> None:
        """A 64 MiB file of 8 KiB pages: headers, fixed-layout rows, free space of zeros."""
        rng = self.rng("db")
        names = [f"{rng.choice(WORDS)} {rng.choice(WORDS)}".encode() for _ in range(500)]
        pages = max(16, int(64 * MIB * self.scale) // PAGE)
        blocks, block = [], bytearray()
        for number in range(pages):
            block += _db_page(rng, number, names)
            if len(block) >= 4 * MIB:
                blocks.append(bytes(block))
                block = bytearray()
        blocks.append(bytes(block))
        self.write(self.root / "var" / "lib" / "db" / "main.db", blocks, "database", 0o600)

    def odd_names(self) -> None:
        """Names that break naive tools: spaces, unicode, control characters, long paths."""
        rng = self.rng("odd")
        base = self.root / "odd"
        names = [
            "with space.txt",
            "  leading spaces",
            "trailing space ",
            "tab\tin name",
            "new\nline.txt",
            "quote'single",
            'quote"double',
            "back\\slash",
            "-starts-with-dash",
            "star*and?question",
            "colon:semi;comma,",
            "日本語のファイル.txt",
            "émigré café.conf",
            "emoji 🎉 party.md",
            "e\u0301 combining (NFD)",
            "Ω≈ç√∫",
            "x" * 99,
            "y" * 100,
            "z" * 101,
            "long-" + "n" * 245,  # 250 bytes: near the file system's 255-byte limit
            os.fsdecode(b"latin1-caf\xe9.txt"),  # not UTF-8: kept as raw bytes
            os.fsdecode(b"\xff\xfe-bytes"),
        ]
        for name in names:
            self.write(base / name, _text(rng, WORDS_LINES, rng.randrange(10, 3000), ""), "odd")
        self.manifest.odd_names += len(names)
        unicode_dir = base / "ünïcödé dir" / "子目录"
        for index in range(5):
            self.write(unicode_dir / f"file {index}.txt", f"{index}\n".encode(), "odd")
        self.manifest.odd_names += 5
        deep = base
        while len(str(deep.relative_to(self.root)).encode()) < 400:  # >255-byte paths
            deep /= f"deeply-nested-directory-{len(deep.parts):03d}-" + "d" * 24
        self.write(deep / "leaf file.txt", b"at the bottom\n", "odd")
        self.manifest.odd_names += 1

    def hardlinks(self) -> None:
        """Second names for existing files, in the same and in other directories."""
        rng = self.rng("hardlinks")
        count = _count(100, self.scale, 3)
        folder = self.root / "srv" / "hardlinks"
        folder.mkdir(parents=True, exist_ok=True)
        sources = [p for p in self.text_files if str(p.relative_to(self.root)) != self.probe]
        for index, source in enumerate(rng.sample(sources, count)):
            target = (
                source.with_name(source.name + ".bak")
                if index % 2
                else folder / (f"link-{index}-{source.name}")
            )
            os.link(source, target)
        self.manifest.hardlinks += count

    def symlinks(self) -> None:
        """Relative, absolute, dangling and directory symlinks."""
        rng = self.rng("symlinks")
        folder = self.root / "links"
        folder.mkdir(parents=True, exist_ok=True)
        count = _count(300, self.scale, 8)
        for index in range(count):
            source = rng.choice(self.text_files)
            kind = index % 4
            if kind == 0:
                target = os.path.relpath(source, folder)
            elif kind == 1:
                target = str(source)
            elif kind == 2:
                target = f"../missing/target-{index}"  # dangling
            else:
                target = os.path.relpath(source.parent, folder)
            link = folder / f"link-{index}"
            os.symlink(target, link)
            stamp = EPOCH + self.times.randrange(0, 200 * 86400)
            os.utime(link, (stamp, stamp), follow_symlinks=False)
        os.symlink("../etc", self.root / "srv" / "etc-link")
        self.manifest.symlinks += count + 1

    def empties(self) -> None:
        for relative in ("var/empty", "srv/cache/empty dir", "home/alice/.config/empty"):
            (self.root / relative).mkdir(parents=True, exist_ok=True)
        for relative in ("var/run/app.pid", "etc/empty.conf", "home/bob/.hushlogin"):
            self.write(self.root / relative, b"", "empty")

    def directory_times(self) -> None:
        """Fixed modes and times on every directory, deepest first."""
        folders = [Path(dirpath) for dirpath, _, _ in os.walk(self.root)]
        self.manifest.directories = len(folders)
        for number, folder in enumerate(sorted(folders, key=lambda p: -len(p.parts))):
            os.chmod(folder, 0o755)
            stamp = EPOCH + 300 * 86400 + number
            os.utime(folder, (stamp, stamp))

    @property
    def probe(self) -> str:
        return self.manifest.probe


# -- content -------------------------------------------------------------------------------

WORDS_LINES = [f"{word} = {index}\n".encode() for index, word in enumerate(WORDS)]


def _config_lines(rng: random.Random, count: int) -> list[bytes]:
    lines = []
    for _ in range(count):
        key = "_".join(rng.choices(WORDS, k=rng.randint(1, 3)))
        choice = rng.random()
        if choice < 0.1:
            lines.append(f"\n[{rng.choice(WORDS)}.{rng.choice(WORDS)}]\n")
        elif choice < 0.2:
            lines.append(f"# {' '.join(rng.choices(WORDS, k=rng.randint(3, 12)))}\n")
        elif choice < 0.5:
            lines.append(f"{key} = {rng.randint(0, 65535)}\n")
        elif choice < 0.7:
            lines.append(f"{key}: {rng.choice(('true', 'false', 'yes', 'no', 'null'))}\n")
        else:
            host = f"{rng.choice(WORDS)}-{rng.randint(1, 99)}.{rng.choice(WORDS)}.internal"
            lines.append(f"  {key}: https://{host}:{rng.randint(1024, 9999)}/{rng.choice(WORDS)}\n")
    return [line.encode() for line in lines]


def _source_lines(rng: random.Random, count: int) -> list[bytes]:
    lines = []
    for _ in range(count):
        a, b, c = rng.choices(WORDS, k=3)
        indent = "    " * rng.randint(0, 3)
        choice = rng.random()
        if choice < 0.15:
            lines.append(f"{indent}def {a}_{b}(self, {c}, timeout={rng.randint(1, 300)}):\n")
        elif choice < 0.3:
            lines.append(f"{indent}return self.{a}.{b}({c}, {rng.random():.4f})\n")
        elif choice < 0.45:
            lines.append(f"{indent}if {a} is None or {b} > {rng.randint(0, 1000)}:\n")
        elif choice < 0.55:
            lines.append(f"{indent}# {' '.join(rng.choices(WORDS, k=rng.randint(4, 14)))}\n")
        elif choice < 0.7:
            lines.append(f'{indent}{a}_{b} = "{c}-{rng.getrandbits(32):08x}"\n')
        elif choice < 0.8:
            lines.append("\n")
        else:
            lines.append(f"{indent}{a} = {b}.{c}({a}, key={rng.randint(0, 99)!r})\n")
    return [line.encode() for line in lines]


def _text(rng: random.Random, lines: list[bytes], size: int, header: str) -> bytes:
    """About `size` bytes: a unique header, then lines drawn from the pool."""
    out = [header.encode()]
    average = sum(len(line) for line in lines[:200]) / min(200, len(lines))
    out += rng.choices(lines, k=max(1, int(size / average)))
    return b"".join(out)


def _log_blocks(rng: random.Random, service: str, size: int, start: int) -> list[bytes]:
    hosts = [f"{service}-{n}" for n in range(4)]
    paths = [f"/{rng.choice(WORDS)}/{rng.choice(WORDS)}" for _ in range(200)]
    messages = [
        "request {method} {path} {status} {ms}ms bytes={bytes}",
        "connection from 10.{a}.{b}.{c}:{port} accepted",
        "job {job:08x} finished in {ms}ms",
        "cache miss for key {job:08x}, fetching from upstream",
        "slow query took {ms}ms: SELECT * FROM {table} WHERE id = {bytes}",
        "retrying {path} after {status} (attempt {a})",
    ]
    blocks, block, filled, clock = [], [], 0, start
    while filled < size:
        clock += rng.random() * 0.5
        text = rng.choice(messages).format(
            method=rng.choice(("GET", "GET", "POST", "PUT", "DELETE")),
            path=rng.choice(paths),
            status=rng.choice((200, 200, 200, 201, 204, 301, 404, 500, 503)),
            ms=rng.randint(1, 2500),
            bytes=rng.randint(0, 10**6),
            a=rng.randint(0, 255),
            b=rng.randint(0, 255),
            c=rng.randint(0, 255),
            port=rng.randint(1024, 65535),
            job=rng.getrandbits(32),
            table=rng.choice(WORDS),
        )
        seconds = int(clock)
        line = (
            f"2024-{1 + seconds // 2592000 % 12:02d}-{1 + seconds // 86400 % 28:02d}T"
            f"{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}."
            f"{int(clock * 1000) % 1000:03d}Z {rng.choice(hosts)} {service}"
            f"[{rng.randint(100, 9999)}]: {rng.choice(LEVELS)} {text}\n"
        ).encode()
        block.append(line)
        filled += len(line)
        if len(block) >= 20000:
            blocks.append(b"".join(block))
            block = []
    blocks.append(b"".join(block))
    return blocks


_ROW = struct.Struct("<QI32sqdI12x")  # id, flags, name, created, amount, version: 72 bytes


def _db_page(rng: random.Random, number: int, names: list[bytes]) -> bytes:
    rows = rng.randint(40, 100)
    header = struct.pack("<4sIQHH", b"PGDB", number, rng.getrandbits(63), rows, 0)
    body = b"".join(
        _ROW.pack(
            number * 200 + row,
            rng.getrandbits(8),
            rng.choice(names),
            EPOCH + rng.randrange(10**7),
            round(rng.uniform(0, 10_000), 2),
            rng.randint(1, 5),
        )
        for row in range(rows)
    )
    return (header + body).ljust(PAGE, b"\0")


# -- mutation ------------------------------------------------------------------------------


@dataclass
class Mutation:
    seed: int
    percent: float
    modified: int = 0
    added: int = 0
    deleted: int = 0
    bytes_written: int = 0


def mutate(root: Path, percent: float = 1.0, seed: int = 2) -> Mutation:
    """Change about `percent`% of the regular files: half modified, a quarter deleted, and
    as many new files added as a quarter; the probe file is left alone."""
    root = Path(root).absolute()
    rng = random.Random(f"mutate:{seed}")
    probe = root / load_manifest(root).probe
    files = sorted(
        Path(dirpath, name)
        for dirpath, _, names in os.walk(root)
        for name in names
        if stat.S_ISREG(os.lstat(os.path.join(dirpath, name)).st_mode)
    )
    files = [path for path in files if path != probe]
    total = max(4, round(len(files) * percent / 100))
    chosen = rng.sample(files, min(total, len(files)))
    modify, delete = chosen[: total // 2], chosen[total // 2 : total // 2 + total // 4]
    add = total - len(modify) - len(delete)
    result = Mutation(seed=seed, percent=percent)
    stamp = MUTATE_EPOCH + seed * 1000
    lines = _config_lines(rng, 200)
    for path in modify:
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            if ".log" in path.name:  # a log grows
                handle.seek(0, os.SEEK_END)
                data = b"".join(_log_blocks(rng, "changed", rng.randrange(10, 200) * KIB, stamp))
            elif size > 1 * MIB:  # a big file changes in place, as a database page would
                handle.seek(rng.randrange(0, size - 64 * KIB) // PAGE * PAGE)
                data = rng.randbytes(64 * KIB)
            else:  # a text file gets a few lines more
                handle.seek(0, os.SEEK_END)
                data = _text(rng, lines, rng.randrange(100, 4000), f"# changed {seed}\n")
            handle.write(data)
        result.bytes_written += len(data)
        os.utime(path, (stamp, stamp))
        result.modified += 1
    for path in delete:
        path.unlink()
        result.deleted += 1
    folders = sorted({path.parent for path in files})
    for index in range(add):
        path = rng.choice(folders) / f"added-{seed}-{index}.conf"
        data = _text(rng, lines, rng.randrange(200, 20_000), f"# added in round {seed}\n")
        path.write_bytes(data)
        os.utime(path, (stamp, stamp))
        result.added += 1
        result.bytes_written += len(data)
    return result


# -- checking ------------------------------------------------------------------------------


def fingerprint(root: Path) -> str:
    """sha256 over every entry's relative name, type, mode, mtime, size, content, link."""
    root = Path(root).absolute()
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            relative = os.fsencode(os.path.relpath(path, root))
            digest.update(relative + b"\0" + f"{info.st_mode:o} {info.st_mtime_ns}".encode())
            if stat.S_ISLNK(info.st_mode):
                digest.update(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataset", description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mutate", type=float, metavar="PERCENT")
    parser.add_argument("--fingerprint", action="store_true")
    parser.add_argument("--force", action="store_true", help="remove ROOT first")
    args = parser.parse_args(argv)
    if args.mutate is not None:
        print(json.dumps(asdict(mutate(args.root, args.mutate, args.seed))))
    elif args.fingerprint:
        print(fingerprint(args.root))
    else:
        if args.force and args.root.exists():
            shutil.rmtree(args.root)
        print(json.dumps(asdict(generate(args.root, args.scale, args.seed)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
