// A new file at --to (a disk image, an export tar) is written as `<to>.partial`,
// created exclusively, and published by a hard link that never replaces a file:
// two restores to the same --to, or one beside the partial file an interrupted
// run left, refuse instead of writing into each other's file or over a finished one.
// Local errors on a target (--to, a drill's --scratch) become one line naming the
// path and the fix, exit 12 (a full disk: 11, as on the receiver).
import { link, open, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { TidemarkError, asTidemarkError } from '../shared/errors.js';
import { fsyncDir } from '../shared/fs-util.js';

export interface PartialFile {
  path: string;
  file: FileHandle;
}

/** Creates `<to>.partial` (mode 0600); E_CONFLICT if it exists. */
export async function createPartial(to: string): Promise<PartialFile> {
  const path = `${to}.partial`;
  try {
    return { path, file: await open(path, 'wx', 0o600) };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw targetError(err, path);
    throw new TidemarkError('E_CONFLICT', `${path} exists: another restore to ${to} is running, or one was interrupted; if none is running, remove ${path} and retry`);
  }
}

/** Filesystems without hard links (vfat, exFAT) refuse link(2) with one of these. */
const NO_LINKS = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP']);

/** Makes the complete `partial` the file `to`; E_CONFLICT, leaving `to` as it is, if `to` appeared meanwhile (the caller removes `partial`). */
export async function publishPartial(partial: string, to: string): Promise<void> {
  const appeared = () => new TidemarkError('E_CONFLICT', `${to} appeared while this restore ran (another restore to it?) and was left as it is; remove it or choose another --to`);
  try {
    await link(partial, to); // unlike rename, fails with EEXIST instead of replacing
    await unlink(partial);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? '';
    if (code === 'EEXIST') throw appeared();
    if (!NO_LINKS.has(code)) throw targetError(err, to);
    // Without hard links: look, then rename; only a restore finishing in between is replaced.
    if (await stat(to).catch(() => undefined)) throw appeared();
    await rename(partial, to);
  }
  fsyncDir(dirname(to));
}

/** What went wrong with a local target, by errno, and what to do about it. */
const PROBLEMS: Record<string, string> = {
  ENOENT: 'its directory does not exist; create it or choose another',
  ENOTDIR: 'a part of its directory is a file, not a directory; choose another',
  EISDIR: 'it is a directory; name a file in it',
  EACCES: 'permission denied; run as a user that may write there or choose another',
  EPERM: 'operation not permitted; choose another',
  EROFS: 'read-only file system; remount it read-write or choose another',
  EFBIG: 'file too large for its filesystem or for this process (ulimit -f); raise the limit or choose another',
  ENXIO: 'the device is gone (detached or unplugged); reattach it or choose another',
  EIO: 'I/O error; check the device (kernel log) or choose another',
};

/**
 * `err` from writing `path` as one line that names it and the fix (`option`: the flag that
 * chose it); a full disk stays E_STORAGE, worded by asTidemarkError. Other errors unchanged.
 */
export function targetError(err: unknown, path: string, { option = '--to', device = false } = {}): unknown {
  const code = (err as NodeJS.ErrnoException | undefined)?.code ?? '';
  if (err instanceof TidemarkError) return err;
  if (code === 'ENOSPC' || code === 'EDQUOT') return new TidemarkError('E_STORAGE', `cannot write ${path}: ${asTidemarkError(err).message}`, { cause: err });
  // A read-only block device lets itself be opened for writing and refuses each write.
  if (device && (code === 'EPERM' || code === 'EROFS')) {
    return new TidemarkError('E_DISK', `cannot write to ${path}: read-only device; make it writable (blockdev --setrw ${path}) or choose another ${option}`, { cause: err });
  }
  const problem = PROBLEMS[code];
  if (!problem) return err;
  return new TidemarkError('E_DISK', `cannot write ${path}: ${problem} ${option}`, { cause: err });
}
