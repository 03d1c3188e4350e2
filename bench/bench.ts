// npm run bench [-- --size 1G] [--json] [--out DIR] [--seed N] [--no-lag]
//
// Builds a realistic ext4 image, runs the real CLIs on loopback and prints each
// figure beside a baseline measured in the same run on the same data. Writes
// DIR/latest.json and DIR/latest.md (default bench/results). See README "Benchmark".
import { copyFileSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { availableParallelism, cpus, loadavg, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { changeBlocks, sha256File } from '../test/fixtures.js';
import { REPO_ROOT, tempDir } from '../test/harness.js';
import { parseSizeBytes } from '../shared/units.js';
import { DEFAULT_BLOCK_BYTES } from '../shared/protocol.js';
import type { ReceiverStatus } from '../receiver/catalog.js';
import { chunkOpenWork, copyImage, dropFromCache, lz4Available, lz4Cli, perBlockWork, rawRead, warmCache, type Timed } from './baselines.js';
import { BenchCluster } from './cluster.js';
import { readHostCpuTicks, stealShareSince } from './proc-watch.js';
import { buildImage, dataBytes } from './image.js';
import { continuousBench, continuousUnavailable, type ContinuousResults } from './continuous.js';
import { tlsLoopback } from './tls-baseline.js';
import { renderMarkdown, renderTable, type BenchResults, type CpuShare } from './report.js';

const MiB = 1024 * 1024;

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      size: { type: 'string', default: '1G' },
      json: { type: 'boolean', default: false },
      out: { type: 'string', default: join(REPO_ROOT, 'bench', 'results') },
      seed: { type: 'string', default: '7' },
      'no-lag': { type: 'boolean', default: false },
    },
  });
  const sizeBytes = parseSizeBytes(values.size!);
  const seed = Number(values.seed);
  const say = (line: string) => (values.json ? process.stderr : process.stdout).write(`${line}\n`);
  const missingLz4 = lz4Available();
  if (missingLz4) throw new Error(missingLz4);

  const loadBefore = loadavg()[0]!;
  const work = tempDir('tidemark-bench-');
  const cluster = await BenchCluster.start();
  try {
    const image = join(work, 'disk.img');
    say(`building a ${values.size} ext4 image (${Math.round(100 * 0.6)} % full)...`);
    await buildImage(image, sizeBytes, seed);
    const data = await dataBytes(image, DEFAULT_BLOCK_BYTES);

    // Throughput figures run from the page cache (warm), so they compare CPU pipelines; the cold
    // read is reported too, as the disk's own limit.
    const baselinesStart = readHostCpuTicks();
    dropFromCache(image);
    const coldRead = rawRead(image, sizeBytes);
    warmCache(image);
    const warmRead = rawRead(image, sizeBytes);
    const lz4 = lz4Cli(image, sizeBytes);
    const blockWork = perBlockWork(image, sizeBytes, DEFAULT_BLOCK_BYTES);
    const chunkOpen = chunkOpenWork(image, sizeBytes, DEFAULT_BLOCK_BYTES);
    const baselineSteal = stealShareSince(baselinesStart);

    say('initial sync...');
    await cluster.enroll('bench');
    const empty = await cluster.deployment.receiver.status();
    const initialStart = readHostCpuTicks();
    const initial = await cluster.runOnce('bench', [image]);
    const initialSteal = stealShareSince(initialStart);
    const status = await cluster.deployment.receiver.status();
    const tls = await tlsLoopback(status.packBytes);

    const initialImageSha = await sha256File(image); // what failback must bring the changed image back to

    say('incremental sync after a 1 % change (hash scan)...');
    const changeCount = Math.max(1, Math.round((data / DEFAULT_BLOCK_BYTES) * 0.01));
    await changeBlocks(image, DEFAULT_BLOCK_BYTES, changeCount, seed + 1);
    warmCache(image);
    const incremental = await cluster.runOnce('bench', [image]);

    say('restore...');
    const restored = join(work, 'restored.img');
    const cp = copyImage(image, join(work, 'copy.img'), sizeBytes);
    const restoreStart = readHostCpuTicks();
    const restore = await cluster.restore('bench', image, incremental.point.pointId, restored);
    const restoreSteal = stealShareSince(restoreStart);
    const restoreMatches = (await sha256File(restored)) === (await sha256File(image));
    rmSync(restored, { force: true });

    say('failback of the initial point onto a copy of the changed image...');
    const failbackTarget = join(work, 'failback.img');
    copyFileSync(image, failbackTarget);
    const failbackStart = readHostCpuTicks();
    const failback = await cluster.restore('bench', image, initial.point.pointId, failbackTarget, ['--failback']);
    const failbackSteal = stealShareSince(failbackStart);
    const failbackMatches = (await sha256File(failbackTarget)) === initialImageSha;
    rmSync(failbackTarget, { force: true });

    let continuous: ContinuousResults | { skipped: string };
    const unavailable = values['no-lag'] ? '--no-lag given' : continuousUnavailable();
    if (unavailable) {
      say(`lag and tracefs incremental: skipped (${unavailable})`);
      continuous = { skipped: unavailable };
    } else {
      say('continuous mode on a loop device: incremental and replication lag...');
      continuous = await continuousBench(cluster, image, work, { dataBytes: data, say });
    }

    const perSecond = (bytes: number, seconds: number) => bytes / MiB / seconds;
    const initialSeconds = initial.point.durationMs / 1000;
    const cores = availableParallelism();
    const results: BenchResults = {
      date: new Date().toISOString(),
      // Load from other work on the machine skews every figure; the 1-minute load average says how much,
      // and steal how much the hypervisor took (from 0 to over 40 % within minutes on the 2-core VM it was built on).
      machine: { cores, cpu: cpus()[0]?.model ?? 'unknown', memoryBytes: totalmem(), node: process.version, loadBefore, loadAfter: loadavg()[0]!, baselineSteal },
      image: { sizeBytes, dataBytes: data, blockBytes: DEFAULT_BLOCK_BYTES, fill: 'ext4, ~60 % full: random binaries, logs, gzip archives, a duplicated directory' },
      baselines: { coldRead: brief(coldRead), warmRead: brief(warmRead), lz4: brief(lz4), blockWork: brief(blockWork), chunkOpen: brief(chunkOpen), cp: brief(cp) },
      initialSync: {
        seconds: initialSeconds,
        imageMiBps: perSecond(sizeBytes, initialSeconds),
        dataMiBps: perSecond(data, initialSeconds),
        vsLz4: perSecond(sizeBytes, initialSeconds) / lz4.mibPerSecond,
        vsBlockWork: perSecond(sizeBytes, initialSeconds) / blockWork.mibPerSecond,
        vsWarmRead: perSecond(sizeBytes, initialSeconds) / warmRead.mibPerSecond,
        vsColdRead: perSecond(sizeBytes, initialSeconds) / coldRead.mibPerSecond,
        bytesRead: initial.point.bytesRead,
        chunksUploaded: initial.point.chunksUploaded,
        chunksDeduplicated: initial.point.chunksDeduplicated,
        cpu: cpuShare(initial.wallSeconds, cores, initialSteal, { agent: initial.agentCpuSeconds, receiver: initial.receiverCpuSeconds }),
        tlsAlone: { bytes: status.packBytes, ...tls },
      },
      incrementalScan: {
        changedBytes: changeCount * DEFAULT_BLOCK_BYTES,
        seconds: incremental.point.durationMs / 1000,
        bytesRead: incremental.point.bytesRead,
        readVsChange: incremental.point.bytesRead / (changeCount * DEFAULT_BLOCK_BYTES),
        timeVsInitial: incremental.point.durationMs / initial.point.durationMs,
      },
      restore: {
        seconds: restore.wallSeconds, mibps: perSecond(sizeBytes, restore.wallSeconds), vsCp: perSecond(sizeBytes, restore.wallSeconds) / cp.mibPerSecond, identical: restoreMatches,
        vsChunkOpen: perSecond(sizeBytes, restore.wallSeconds) / chunkOpen.mibPerSecond,
        cpu: cpuShare(restore.wallSeconds, cores, restoreSteal, { restore: restore.restoreCpuSeconds, receiver: restore.receiverCpuSeconds }),
      },
      failback: {
        seconds: failback.wallSeconds, mibps: perSecond(sizeBytes, failback.wallSeconds), vsCp: perSecond(sizeBytes, failback.wallSeconds) / cp.mibPerSecond,
        bytesRead: failback.report.bytesRead, blocksWritten: failback.report.blocksWritten, changedBlocks: changeCount, identical: failbackMatches,
        cpu: cpuShare(failback.wallSeconds, cores, failbackSteal, { restore: failback.restoreCpuSeconds, receiver: failback.receiverCpuSeconds }),
      },
      storage: { dataBytes: data, storedChunkBytes: status.storedChunkBytes, packBytes: status.packBytes, storedVsData: status.packBytes / data },
      catalog: catalogGrowth(empty, status, DEFAULT_BLOCK_BYTES),
      memory: {
        agentPeakRssBytes: cluster.agentPeakRssBytes,
        agentInitialSyncRssBytes: initial.peakRssBytes,
        agentIncrementalRssBytes: incremental.peakRssBytes,
        restorePeakRssBytes: restore.peakRssBytes,
        receiverPeakRssBytes: cluster.receiverPeakRssBytes,
      },
      continuous,
    };
    mkdirSync(resolve(values.out!), { recursive: true });
    writeFileSync(join(values.out!, 'latest.json'), JSON.stringify(results, null, 2) + '\n');
    writeFileSync(join(values.out!, 'latest.md'), renderMarkdown(results));
    if (values.json) process.stdout.write(JSON.stringify(results, null, 2) + '\n');
    else process.stdout.write(renderTable(results) + `\nresults written to ${join(values.out!, 'latest.md')}\n`);
  } finally {
    await cluster.close();
    rmSync(work, { recursive: true, force: true });
  }
}

function brief(t: Timed): { seconds: number; mibps: number } {
  return { seconds: t.seconds, mibps: t.mibPerSecond };
}

/**
 * What the initial sync added to the catalog, per block version it recorded (each with its chunk row:
 * the bench's blocks barely dedup), and what that makes for a fully written TiB of such blocks.
 */
function catalogGrowth(before: ReceiverStatus, after: ReceiverStatus, blockBytes: number): BenchResults['catalog'] {
  const blockVersions = after.blockVersions - before.blockVersions;
  const bytesPerBlockVersion = (after.catalogBytes - before.catalogBytes) / blockVersions;
  return { blockVersions, catalogBytes: after.catalogBytes, bytesPerBlockVersion, bytesPerTiB: bytesPerBlockVersion * (1024 ** 4 / blockBytes) };
}

/** CPU seconds per process over a wall time, and the share of the machine's cores they kept busy. */
function cpuShare(wallSeconds: number, cores: number, steal: number, seconds: Record<string, number>): CpuShare {
  const total = Object.values(seconds).reduce((sum, s) => sum + s, 0);
  return { seconds, busyCores: total / wallSeconds, cores, steal };
}

main().catch((err) => {
  process.stderr.write(`bench failed: ${(err as Error).stack ?? err}\n`);
  process.exitCode = 1;
});
