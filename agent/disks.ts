// Disk discovery for the agent: what a path is (block device or image file),
// how big it is, and how many of its blocks actually hold data.
import { existsSync, readFileSync, readdirSync, statSync, type Stats } from 'node:fs';
import { dirname } from 'node:path';
import { sysfsDir } from '../shared/block-device.js';
import { TidemarkError } from '../shared/errors.js';
import { DiskReader } from '../shared/disk-reader.js';
import { isZeroBlock } from '../shared/zero-block.js';

export interface DiskInfo {
  /** The path as given (block devices: as given too, e.g. /dev/sdb1 or a by-id link). */
  path: string;
  kind: 'block' | 'image';
  sizeBytes: number;
  /** Logical sector size; 512 for image files. */
  sectorBytes: number;
  /** Bytes in non-zero blocks of `blockBytes` (a short final block counts by its real length); -1 when not measured. */
  dataBytes: number;
  /** "maj:min" of this device; null for image files. */
  devMajorMinor: string | null;
  /** Whole disk's "maj:min" when this is a partition, else null. */
  parentDevMajorMinor: string | null;
  /**
   * Partition start in 512-byte sectors (sysfs `start`, always 512-byte units
   * whatever the logical sector size); 0 unless a partition. tracefs reports
   * partition writes on the whole disk's dev number with absolute sectors.
   */
  partitionStartSector: number;
}

export interface DescribeOptions {
  /** Read the whole disk and count non-zero blocks (default true). */
  measureData?: boolean;
  /** Block size for the non-zero count (default 65536). */
  blockBytes?: number;
  onProgress?: (bytesDone: number, bytesTotal: number) => void;
}

const DEFAULT_BLOCK_BYTES = 65536;
const READ_TARGET_BYTES = 4 * 1024 * 1024;

export async function describeDisk(path: string, opts: DescribeOptions = {}): Promise<DiskInfo> {
  const blockBytes = opts.blockBytes ?? DEFAULT_BLOCK_BYTES;
  if (!Number.isInteger(blockBytes) || blockBytes <= 0) {
    throw new TidemarkError('E_USAGE', `invalid block size ${blockBytes}: use a positive whole number of bytes, e.g. 65536`);
  }
  const st = statDisk(path);
  const info = st.isBlockDevice() ? describeBlockDevice(path, st) : describeImage(path, st);
  if (opts.measureData ?? true) {
    info.dataBytes = await measureDataBytes(path, info.sizeBytes, blockBytes, opts.onProgress);
  }
  return info;
}

/**
 * A disk `run` protects: describeDisk without measuring, refusing a block device of size 0
 * (a detached loop device, removed media), whose point would restore as an empty disk.
 */
export async function describeProtectedDisk(path: string): Promise<DiskInfo> {
  const info = await describeDisk(path, { measureData: false });
  if (info.kind === 'block' && info.sizeBytes === 0) {
    throw new TidemarkError('E_DISK', `disk ${path} has size 0 (a detached loop device, or removed media): attach it again, or leave it out of --disk`);
  }
  return info;
}

/** stat that turns every unusable kind of path into a one-line E_DISK error (never creates anything). */
function statDisk(path: string): Stats {
  let st: Stats;
  try {
    st = statSync(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      throw new TidemarkError('E_DISK', `disk ${path} does not exist: pass an existing block device (e.g. /dev/sdb) or disk image file`, { cause: err });
    }
    if (code === 'EACCES' || code === 'EPERM') {
      throw new TidemarkError('E_DISK', `cannot access disk ${path}: run as root or grant read access to it`, { cause: err });
    }
    throw new TidemarkError('E_DISK', `cannot stat disk ${path}: ${(err as Error).message}`, { cause: err });
  }
  if (st.isBlockDevice() || st.isFile()) return st;
  const what = st.isDirectory() ? 'a directory' : st.isCharacterDevice() ? 'a character device' : 'not a block device or regular file';
  throw new TidemarkError('E_DISK', `disk ${path} is ${what}: pass a block device (e.g. /dev/sdb) or a disk image file`);
}

function describeImage(path: string, st: Stats): DiskInfo {
  return {
    path,
    kind: 'image',
    sizeBytes: st.size,
    sectorBytes: 512,
    dataBytes: -1,
    devMajorMinor: null,
    parentDevMajorMinor: null,
    partitionStartSector: 0,
  };
}

function describeBlockDevice(path: string, st: Stats): DiskInfo {
  const sys = sysfsDir(path, st);
  const isPartition = existsSync(`${sys}/partition`);
  const wholeDisk = isPartition ? dirname(sys) : sys;
  return {
    path,
    kind: 'block',
    sizeBytes: readSysNumber(`${sys}/size`) * 512, // sysfs size is always in 512-byte units
    sectorBytes: readSysNumber(`${wholeDisk}/queue/logical_block_size`),
    dataBytes: -1,
    devMajorMinor: readSysText(`${sys}/dev`),
    parentDevMajorMinor: isPartition ? readSysText(`${wholeDisk}/dev`) : null,
    partitionStartSector: isPartition ? readSysNumber(`${sys}/start`) : 0,
  };
}

function readSysText(file: string): string {
  return readFileSync(file, 'utf8').trim();
}

function readSysNumber(file: string): number {
  const value = Number(readSysText(file));
  if (!Number.isFinite(value)) throw new TidemarkError('E_DISK', `unexpected content in ${file}: expected a number`);
  return value;
}

/** Reads the disk sequentially and returns the bytes in non-zero blocks. */
async function measureDataBytes(
  path: string,
  sizeBytes: number,
  blockBytes: number,
  onProgress?: (bytesDone: number, bytesTotal: number) => void,
): Promise<number> {
  // A whole number of blocks per read, so no block straddles two reads.
  const chunkBytes = blockBytes * Math.max(1, Math.floor(READ_TARGET_BYTES / blockBytes));
  let reader: DiskReader;
  try {
    reader = await DiskReader.open(path, chunkBytes);
  } catch (err) {
    throw new TidemarkError('E_DISK', `cannot open disk ${path} for reading: ${(err as Error).message} (run as root or grant read access)`, { cause: err });
  }
  try {
    let dataBytes = 0;
    for (let done = 0; done < sizeBytes; ) {
      const buf = await reader.read(done, Math.min(chunkBytes, sizeBytes - done));
      for (let off = 0; off < buf.length; off += blockBytes) {
        const block = buf.subarray(off, off + blockBytes);
        if (!isZeroBlock(block)) dataBytes += block.length;
      }
      done += buf.length;
      onProgress?.(done, sizeBytes);
    }
    return dataBytes;
  } finally {
    await reader.close();
  }
}

/** Named disks, each measured; the first that cannot be read ends it (the operator asked for that one). */
export async function describeDisks(paths: string[]): Promise<DiskInfo[]> {
  const disks: DiskInfo[] = [];
  for (const path of paths) disks.push(await describeDisk(path, { measureData: true }));
  return disks;
}

/** A block device `scan` could not read, and why. */
export interface SkippedDisk {
  path: string;
  reason: string;
}

/**
 * Every block device `listBlockDevices` offers, described and measured. One that cannot be
 * read (removed media, a device the host's policy denies even to root) is skipped with its
 * reason, so the listing still shows the others; when none can be read, the first error stands.
 */
export async function scanBlockDevices(): Promise<{ disks: DiskInfo[]; skipped: SkippedDisk[] }> {
  const disks: DiskInfo[] = [];
  const skipped: SkippedDisk[] = [];
  let firstError: TidemarkError | undefined;
  for (const path of await listBlockDevices()) {
    try {
      disks.push(await describeDisk(path, { measureData: true }));
    } catch (err) {
      if (!(err instanceof TidemarkError) || err.code !== 'E_DISK') throw err;
      firstError ??= err;
      skipped.push({ path, reason: err.message });
    }
  }
  if (disks.length === 0 && firstError) throw firstError;
  return { disks, skipped };
}

/** /dev/NAME for each disk in /sys/block worth offering (skips ram/zram and size-0 devices such as unattached loops, empty dm/sr). */
export async function listBlockDevices(): Promise<string[]> {
  let names: string[];
  try {
    names = readdirSync('/sys/block');
  } catch (err) {
    throw new TidemarkError('E_DISK', `cannot list /sys/block: ${(err as Error).message} (is /sys mounted?)`, { cause: err });
  }
  const result: string[] = [];
  for (const name of names.sort()) {
    if (/^(ram|zram)\d/.test(name)) continue;
    let sectors: number;
    try {
      sectors = Number(readSysText(`/sys/block/${name}/size`));
    } catch {
      continue;
    }
    if (!(sectors > 0)) continue;
    result.push(`/dev/${name.replace(/!/g, '/')}`); // sysfs writes "/" in names as "!" (e.g. cciss!c0d0)
  }
  return result;
}
