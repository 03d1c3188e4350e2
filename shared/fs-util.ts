// Durable file writes: temp file, write, fsync, rename, fsync the directory.
import { closeSync, fsyncSync, openSync, renameSync, writevSync, rmSync } from 'node:fs';
import { dirname } from 'node:path';

export function fsyncDir(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export function writeFileDurable(path: string, data: string | Buffer, mode = 0o644): void {
  const tmp = `${path}.tmp-${process.pid}`;
  // Created afresh and exclusively: a file left or planted at this name would keep its own mode
  // (a key file readable by others), and a symlink there would be written through, as root.
  rmSync(tmp, { force: true });
  const fd = openSync(tmp, 'wx', mode);
  try {
    writeAllSync(fd, [typeof data === 'string' ? Buffer.from(data) : data], 0);
    fsyncSync(fd);
  } catch (err) {
    closeSync(fd);
    rmSync(tmp, { force: true });
    throw err;
  }
  closeSync(fd);
  renameSync(tmp, path);
  fsyncDir(dirname(path));
}

/**
 * Writes every byte of `buffers` at `position`, or throws. A write(2) on a nearly full
 * filesystem may write only part of what it was given and report success; the rest
 * is retried, and the retry then fails with ENOSPC instead of leaving a silent gap.
 */
export function writeAllSync(fd: number, buffers: Buffer[], position: number): void {
  let pending = buffers.filter((b) => b.length > 0);
  while (pending.length > 0) {
    let written = writevSync(fd, pending, position);
    if (written === 0) throw Object.assign(new Error(`write made no progress at offset ${position}`), { code: 'ENOSPC' });
    position += written;
    while (pending.length > 0 && written >= pending[0]!.length) written -= pending.shift()!.length;
    if (written > 0) pending[0] = pending[0]!.subarray(written);
  }
}
