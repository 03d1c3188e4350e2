// File names for disk images that export and drill write: a disk's name is
// its path on the protected host (`/dev/vdb`), which is no file name.
const MAX_STEM_CHARS = 96;

/** `/dev/vdb` → `dev_vdb`: letters, digits, `.`, `_`, `-` only, no leading dot, unique among `names`. */
export function diskFileStems(names: string[]): Map<string, string> {
  const stems = new Map<string, string>();
  const taken = new Set<string>();
  for (const name of names) {
    const base = name
      .replace(/\.img$/i, '')
      .replace(/[^A-Za-z0-9._-]+/g, '_')
      .slice(-MAX_STEM_CHARS)
      .replace(/^[._]+/, '') || 'disk';
    let stem = base;
    for (let n = 2; taken.has(stem); n++) stem = `${base}-${n}`;
    taken.add(stem);
    stems.set(name, stem);
  }
  return stems;
}
