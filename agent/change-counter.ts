// A cheap witness of "was this disk written meanwhile?", used to prove that a
// hash-scan pass read a state the disk really had (crash consistency, SPEC §8).
// Block devices: the kernel's write and discard counters in /sys/class/block/X/stat.
// Image files: size, mtime and ctime at nanosecond resolution.
import { readFileSync, statSync } from 'node:fs';
import { sysfsDir } from '../shared/block-device.js';

export function changeCounter(path: string): string {
  const st = statSync(path, { bigint: true });
  if (!st.isBlockDevice()) return `file:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;
  const fields = readFileSync(`${sysfsDir(path)}/stat`, 'utf8').trim().split(/\s+/);
  // Fields (Documentation/block/stat.rst): 4 write I/Os, 6 write sectors, 11 discard I/Os, 13 discard sectors.
  return `block:${fields[4]}:${fields[6]}:${fields[11] ?? 0}:${fields[13] ?? 0}`;
}

export function changeCounters(paths: string[]): string[] {
  return paths.map(changeCounter);
}
