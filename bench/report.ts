// The bench's output: a text table for the terminal, Markdown for the results
// file; both from the same JSON document (`--json`).
import type { ContinuousResults } from './continuous.js';

/** CPU seconds (user + system, every thread) per process over a wall time; busyCores = their sum / that time. */
export interface CpuShare {
  seconds: Record<string, number>;
  busyCores: number;
  cores: number;
  /** Share of the machine's CPU time the hypervisor took meanwhile (bench/proc-watch.ts). */
  steal: number;
}

export interface BenchResults {
  date: string;
  /** baselineSteal: the hypervisor's share of CPU time while the baselines ran. */
  machine: { cores: number; cpu: string; memoryBytes: number; node: string; loadBefore: number; loadAfter: number; baselineSteal: number };
  image: { sizeBytes: number; dataBytes: number; blockBytes: number; fill: string };
  baselines: Record<'coldRead' | 'warmRead' | 'lz4' | 'blockWork' | 'chunkOpen' | 'cp', { seconds: number; mibps: number }>;
  initialSync: {
    seconds: number; imageMiBps: number; dataMiBps: number; vsLz4: number; vsBlockWork: number; vsWarmRead: number; vsColdRead: number;
    bytesRead: number; chunksUploaded: number; chunksDeduplicated: number; cpu: CpuShare;
    /** The bytes it stored, sent through TLS on loopback and nothing else (bench/tls-baseline.ts). */
    tlsAlone: { bytes: number; seconds: number; mibps: number; cpuSeconds: number };
  };
  incrementalScan: { changedBytes: number; seconds: number; bytesRead: number; readVsChange: number; timeVsInitial: number };
  restore: { seconds: number; mibps: number; vsCp: number; identical: boolean; vsChunkOpen: number; cpu: CpuShare };
  /** The initial point failed back onto a copy of the image after its 1 % change: the whole disk read, the changed blocks written. */
  failback: { seconds: number; mibps: number; vsCp: number; bytesRead: number; blocksWritten: number; changedBlocks: number; identical: boolean; cpu: CpuShare };
  storage: { dataBytes: number; storedChunkBytes: number; packBytes: number; storedVsData: number };
  /** Catalog growth over the initial sync (DESIGN §6 budget: under 1 GiB for a fully written TiB). */
  catalog: { blockVersions: number; catalogBytes: number; bytesPerBlockVersion: number; bytesPerTiB: number };
  memory: { agentPeakRssBytes: number; agentInitialSyncRssBytes: number; agentIncrementalRssBytes: number; restorePeakRssBytes: number; receiverPeakRssBytes: number };
  continuous: ContinuousResults | { skipped: string };
}

type Row = [figure: string, value: string, baseline: string, target: string];

const MiB = 1024 * 1024;
const mib = (b: number) => `${(b / MiB).toFixed(1)} MiB`;
const rate = (r: number) => `${r.toFixed(0)} MiB/s`;
const x = (r: number) => `${r.toFixed(2)}×`;
const s = (sec: number) => `${sec.toFixed(2)} s`;
const verdict = (ok: boolean) => (ok ? 'met' : 'MISSED');
const cpu = (c: CpuShare) => `${Object.entries(c.seconds).map(([name, sec]) => `${name} ${sec.toFixed(1)}`).join(' + ')} CPU-s`;
const pct = (share: number) => `${(100 * share).toFixed(0)} %`;
const busy = (c: CpuShare) => `${c.busyCores.toFixed(2)} of ${c.cores} cores busy; steal ${pct(c.steal)}`;

export function rows(r: BenchResults): Row[] {
  const i = r.initialSync;
  const out: Row[] = [
    ['initial sync (image)', rate(i.imageMiBps), `lz4 -1 one core ${rate(r.baselines.lz4.mibps)} → ${x(i.vsLz4)}`, `≥ 1.5× lz4: ${verdict(i.vsLz4 >= 1.5)}`],
    ['initial sync (data)', rate(i.dataMiBps), `${mib(r.image.dataBytes)} of data in ${s(i.seconds)}`, ''],
    ['  vs sequential read', rate(i.imageMiBps), `warm ${rate(r.baselines.warmRead.mibps)} (${x(i.vsWarmRead)}), cold ${rate(r.baselines.coldRead.mibps)} (${x(i.vsColdRead)})`, ''],
    ['  vs the per-block work', rate(i.imageMiBps), `hash, id, lz4, AES-GCM on one core ${rate(r.baselines.blockWork.mibps)} → ${x(i.vsBlockWork)}`, ''],
    ['  vs TLS alone', s(i.seconds), `the ${mib(i.tlsAlone.bytes)} stored, through TLS on loopback: ${s(i.tlsAlone.seconds)} (${rate(i.tlsAlone.mibps)}), ${i.tlsAlone.cpuSeconds.toFixed(1)} CPU-s`, ''],
    ['  CPU time', cpu(i.cpu), busy(i.cpu), ''],
    ['incremental, hash scan (run --once)', s(r.incrementalScan.seconds), `reads ${mib(r.incrementalScan.bytesRead)} for a ${mib(r.incrementalScan.changedBytes)} change (${x(r.incrementalScan.readVsChange)}); ${(100 * r.incrementalScan.timeVsInitial).toFixed(1)} % of initial`, 'scan mode reads the whole disk by design'],
  ];
  if ('skipped' in r.continuous) {
    out.push(['continuous mode (tracefs)', 'skipped', r.continuous.skipped, '']);
  } else {
    const c = r.continuous;
    out.push(
      ['incremental, tracefs (1 % change)', s(c.incremental.seconds), `reads ${mib(c.incremental.bytesRead)} for a ${mib(c.incremental.changedBytes)} change (${x(c.incremental.readVsChange)}); ${(100 * c.incremental.seconds / i.seconds).toFixed(1)} % of initial`,
        `≤ 1.2× read: ${verdict(c.incremental.readVsChange <= 1.2)}; < 5 % time: ${verdict(c.incremental.seconds < 0.05 * i.seconds)}`],
      ...c.lag.map((l): Row => [`lag at ${l.targetMBps} MB/s random writes`, `p50 ${s(l.p50Seconds)}, p99 ${s(l.p99Seconds)}`,
        `achieved ${l.achievedMBps.toFixed(1)} MB/s, ${l.writes} writes${l.unreplicated ? `, ${l.unreplicated} not replicated in time` : ''}`,
        l.targetMBps === 20 ? `p99 ≤ 2 s: ${verdict(l.p99Seconds <= 2)}` : '']),
      ['highest sustained write rate (p99 < 5 s)', c.sustainedMBps === null ? 'none' : `${c.sustainedMBps.toFixed(1)} MB/s`, c.sustainedNote, ''],
    );
  }
  out.push(
    ['restore', rate(r.restore.mibps), `cp ${rate(r.baselines.cp.mibps)} → ${x(r.restore.vsCp)}${r.restore.identical ? ', image identical' : ', IMAGE DIFFERS'}`, `≥ 0.5× cp: ${verdict(r.restore.vsCp >= 0.5)}`],
    ['  vs opening the chunks', rate(r.restore.mibps), `AES-GCM, lz4, id check on one core ${rate(r.baselines.chunkOpen.mibps)} → ${x(r.restore.vsChunkOpen)}`, ''],
    ['  CPU time', cpu(r.restore.cpu), busy(r.restore.cpu), ''],
    ['failback after a 1 % change', rate(r.failback.mibps),
      `cp ${rate(r.baselines.cp.mibps)} → ${x(r.failback.vsCp)}; read ${mib(r.failback.bytesRead)}, wrote ${r.failback.blocksWritten} blocks for ${r.failback.changedBlocks} changed` +
        (r.failback.identical ? ', image back at the point' : ', IMAGE DIFFERS'), ''],
    ['  CPU time', cpu(r.failback.cpu), busy(r.failback.cpu), ''],
    ['stored bytes', mib(r.storage.packBytes), `data ${mib(r.storage.dataBytes)} → ${x(r.storage.storedVsData)} (dedup + lz4)`, ''],
    ['catalog per block version', `${Math.round(r.catalog.bytesPerBlockVersion)} B`,
      `${mib(r.catalog.catalogBytes)} after the initial sync's ${r.catalog.blockVersions} → ${(r.catalog.bytesPerTiB / 1024 ** 3).toFixed(1)} GiB per fully written TiB`,
      `≤ 1 GiB per TiB: ${verdict(r.catalog.bytesPerTiB <= 1024 ** 3)}`],
    ['agent peak RSS', mib(r.memory.agentPeakRssBytes),
      `run --once initial ${mib(r.memory.agentInitialSyncRssBytes)}, incremental ${mib(r.memory.agentIncrementalRssBytes)}` +
        ('skipped' in r.continuous ? '' : `, continuous ${mib(r.continuous.agentPeakRssBytes)}`) + `; restore ${mib(r.memory.restorePeakRssBytes)}`,
      `≤ 300 MiB: ${verdict(r.memory.agentPeakRssBytes <= 300 * MiB)}`],
    ['receiver peak RSS', mib(r.memory.receiverPeakRssBytes), '', `≤ 500 MiB: ${verdict(r.memory.receiverPeakRssBytes <= 500 * MiB)}`],
  );
  return out;
}

function header(r: BenchResults): string {
  return `${r.date} · ${r.machine.cores} cores (${r.machine.cpu}), load average ${r.machine.loadBefore.toFixed(1)} before / ${r.machine.loadAfter.toFixed(1)} after, steal ${pct(r.machine.baselineSteal)} during the baselines · Node ${r.machine.node} · image ${mib(r.image.sizeBytes)}, ${mib(r.image.dataBytes)} data, ${r.image.blockBytes / 1024} KiB blocks`;
}

export function renderTable(r: BenchResults): string {
  const all: Row[] = [['figure', 'value', 'baseline (same run)', 'target'], ...rows(r)];
  const widths = [0, 1, 2].map((c) => Math.max(...all.map((row) => row[c]!.length)));
  const line = (row: Row) => row.map((cell, c) => (c < 3 ? cell.padEnd(widths[c]!) : cell)).join('  ').trimEnd();
  return [header(r), '', line(all[0]!), widths.map((w) => '-'.repeat(w)).join('  '), ...all.slice(1).map(line)].join('\n') + '\n';
}

export function renderMarkdown(r: BenchResults): string {
  const cell = (t: string) => t.replace(/\|/g, '\\|');
  return [
    '# Benchmark results', '', `Produced by \`npm run bench\`. ${header(r)}.`, '',
    '| figure | value | baseline (same run) | target |', '|---|---|---|---|',
    ...rows(r).map((row) => `| ${row.map(cell).join(' | ')} |`), '',
    'Raw figures: [latest.json](latest.json).', '',
  ].join('\n');
}
