// Local errors on a restore target (--to, a drill's --scratch) become one line
// naming the path and the fix, exit 12 (a full disk: 11, as on the receiver).
import { TidemarkError, asTidemarkError } from '../shared/errors.js';

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
