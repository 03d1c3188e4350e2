// Facts about a block device that Node's fs does not give (fstat reports size 0).
import { constants, readFileSync, realpathSync, statSync, type Stats } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { basename } from 'node:path';
import { TidemarkError } from './errors.js';

/**
 * The device's sysfs directory, symlinks resolved (so ".." of a partition is
 * its whole disk). Found by the node's device number via /sys/dev/block/MAJ:MIN,
 * which works for nodes with any name; falls back to /sys/class/block/NAME.
 */
export function sysfsDir(devicePath: string, st: Stats = statSync(devicePath)): string {
  const rdev = st.rdev;
  // Linux dev_t encoding (glibc major()/minor()).
  const major = ((rdev >>> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >>> 12) & ~0xff);
  for (const candidate of [`/sys/dev/block/${major}:${minor}`, `/sys/class/block/${basename(realpathSync(devicePath))}`]) {
    try {
      return realpathSync(candidate);
    } catch {
      // try the next
    }
  }
  throw new TidemarkError('E_DISK', `block device ${devicePath} (${major}:${minor}) has no sysfs entry: is /sys mounted?`);
}

export function blockDeviceSizeBytes(devicePath: string): number {
  return Number(readFileSync(`${sysfsDir(devicePath)}/size`, 'utf8').trim()) * 512;
}

/**
 * Opens a block device to restore onto it. O_EXCL makes the kernel refuse a
 * device that is mounted or otherwise claimed (a mounted partition of it, a
 * RAID or swap member): writing under a live filesystem corrupts both.
 */
export async function openDeviceForWriting(devicePath: string): Promise<FileHandle> {
  try {
    return await open(devicePath, constants.O_RDWR | constants.O_EXCL);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EBUSY') throw err;
    throw new TidemarkError('E_CONFLICT', `${devicePath} is in use (mounted, or claimed by swap, RAID or a mounted partition); unmount it before restoring onto it`);
  }
}
