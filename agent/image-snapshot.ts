// Reflink snapshots of image files (DESIGN §4, SPEC §8). On a filesystem that
// shares extents between files (XFS, Btrfs), a clone of an image (FICLONE) is
// an unchanging copy of it, made at once under the image's locks. A hash-scan
// pass that reads the clones reads a state the images really had, however busy
// their writers, so its point is crash-consistent without converging passes.
// Where cloning is not possible the pass reads the live images, as before.
//
// The clone shares the image's blocks until the image is written: each block
// written while a pass reads costs its size once more on that filesystem.
import { statSync } from 'node:fs';
import { constants, copyFile, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { changeCounters } from './change-counter.js';

/** Several images are cloned one after another; this many tries for a moment none of them changed in. */
const GROUP_CLONE_ATTEMPTS = 5;

/** Filesystems (st_dev) found unable to clone: not asked again by this process, which would create and delete a file beside the image every cycle. */
const cannotClone = new Map<number, string>();
const NOT_SUPPORTED = new Set(['ENOTSUP', 'EOPNOTSUPP', 'EXDEV', 'ENOSYS']);

export interface ImageSnapshots {
  /** The clones, in the order of the images. */
  readPaths: string[];
  /** Every clone holds its image as it was at this time. */
  cutMs: number;
  remove(): Promise<void>;
}

/**
 * Beside the image, because a clone must be on the image's filesystem. One name per image:
 * a clone left behind by a killed agent is replaced by the next one.
 */
export function snapshotPath(image: string): string {
  return join(dirname(image), `.${basename(image)}.tidemark-snapshot`);
}

/** Clones of every image, or why there are none (a disk is a block device, the filesystem cannot clone, the images kept changing). */
export async function snapshotImages(images: string[]): Promise<ImageSnapshots | { unavailable: string }> {
  const stats = images.map((path) => statSync(path));
  const device = images.find((_, i) => stats[i]!.isBlockDevice());
  if (device) return { unavailable: `${device} is a block device` };
  const known = stats.map((st) => cannotClone.get(st.dev)).find((reason) => reason !== undefined);
  if (known) return { unavailable: known };
  const readPaths = images.map(snapshotPath);
  const remove = async () => {
    await Promise.all(readPaths.map((path) => rm(path, { force: true })));
  };
  for (let attempt = 0; attempt < GROUP_CLONE_ATTEMPTS; attempt++) {
    const before = changeCounters(images);
    const cutMs = Date.now();
    for (const [i, image] of images.entries()) {
      try {
        // Created exclusively, after removing what is there: the agent runs as root, and a symlink
        // someone who may write the image's directory put at this name would otherwise be written
        // through (its target truncated and given the image's mode, before the clone even fails).
        await rm(readPaths[i]!, { force: true });
        await copyFile(image, readPaths[i]!, constants.COPYFILE_EXCL | constants.COPYFILE_FICLONE_FORCE);
      } catch (err) {
        await remove();
        const code = (err as NodeJS.ErrnoException).code ?? (err as Error).message;
        const unavailable = `${image} cannot be cloned (${code}); reflink snapshots need XFS or Btrfs`;
        if (NOT_SUPPORTED.has(code)) cannotClone.set(stats[i]!.dev, unavailable);
        return { unavailable };
      }
    }
    // One clone is one instant. Clones made one after another are one state of the group only if no image changed in between.
    if (images.length === 1 || changeCounters(images).every((counter, i) => counter === before[i])) return { readPaths, cutMs, remove };
  }
  await remove();
  return { unavailable: `the images kept changing while they were cloned (${GROUP_CLONE_ATTEMPTS} tries)` };
}
