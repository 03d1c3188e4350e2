// What the three executables share: error → one line + exit code, secrets
// from the environment or a file (never argv), JSON output.
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { Command, CommanderError, Option } from 'commander';
import { TidemarkError, asTidemarkError } from './errors.js';

/** Exit status when stdout's reader went away (`status | head`): a shell's for a command killed by SIGPIPE. */
export const EXIT_STDOUT_CLOSED = 128 + 13;

export async function runCli(program: Command, argv = process.argv): Promise<void> {
  // Node ignores SIGPIPE, so a closed stdout would be an unhandled EPIPE with a stack trace.
  // Other errors are the writer's to report (export --to - ends its pipeline with the cause).
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(EXIT_STDOUT_CLOSED);
  });
  // Commander's own errors (unknown or missing options, conflicts) are usage errors, exit 2, in every
  // subcommand: the settings are not inherited by commands created before they are made.
  const commands = [program];
  for (const command of commands) {
    command.exitOverride();
    command.configureOutput({ writeErr: (s) => process.stderr.write(s.startsWith('error:') ? '' : s) });
    commands.push(...command.commands);
  }
  try {
    await program.parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.exitCode === 0) return; // --help, --version
      process.stderr.write(`${program.name()}: ${err.message.replace(/^error: /, '')} (see --help)\n`);
      process.exitCode = 2;
      return;
    }
    const error = asTidemarkError(err);
    process.stderr.write(`${program.name()}: ${printable(error.message)}\n`); // one line, whatever a receiver's message holds
    if (error.code === 'E_INTERNAL' && process.env.TIDEMARK_DEBUG) process.stderr.write(`${(err as Error).stack}\n`);
    process.exitCode = error.exitCode;
  }
}

/**
 * Control characters (C0, DEL, C1), line separators and bidirectional overrides, shown as
 * `\xHH` or `\uHHHH`. Text another party chose — an agent's disk names and status reason, a
 * receiver's error messages — is printed through this: it must not move the cursor, recolour
 * or retitle the terminal, or add a line that passes for one of ours.
 */
const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

export function printable(text: string): string {
  return text.replace(UNPRINTABLE, (c) => {
    const code = c.charCodeAt(0);
    return code <= 0xff ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
  });
}

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}

export const passphraseFileOption = () => new Option('--passphrase-file <file>', 'file holding the key passphrase (else TIDEMARK_PASSPHRASE or TIDEMARK_PASSPHRASE_FILE)');

/** The vault passphrase: --passphrase-file, TIDEMARK_PASSPHRASE_FILE or TIDEMARK_PASSPHRASE (never argv). */
export function readPassphrase(passphraseFile?: string): string {
  const file = passphraseFile ?? process.env.TIDEMARK_PASSPHRASE_FILE;
  if (file) {
    try {
      return readFileSync(file, 'utf8').replace(/\r?\n$/, '');
    } catch (err) {
      throw new TidemarkError('E_USAGE', `cannot read passphrase file ${file}: ${(err as Error).message}`);
    }
  }
  const value = process.env.TIDEMARK_PASSPHRASE;
  if (value) return value;
  throw new TidemarkError('E_USAGE', 'no passphrase: set TIDEMARK_PASSPHRASE or TIDEMARK_PASSPHRASE_FILE, or pass --passphrase-file');
}

export const TOKEN_ARGV_WARNING = '--token is visible to other users in ps; prefer TIDEMARK_TOKEN or --token-file';

/**
 * A token or credential: --token-file FILE, --token T or TIDEMARK_TOKEN. --token stays
 * (CLI contract) but warns: argv is readable by every local user (ps, /proc/PID/cmdline).
 */
export function readToken(flag?: string, file?: string): string {
  if (flag !== undefined && file !== undefined) throw new TidemarkError('E_USAGE', 'pass either --token or --token-file, not both');
  let token: string | undefined;
  if (file !== undefined) {
    try {
      token = readFileSync(file, 'utf8');
    } catch (err) {
      throw new TidemarkError('E_USAGE', `cannot read token file ${file}: ${(err as Error).message}`);
    }
    if (!token.trim()) throw new TidemarkError('E_USAGE', `token file ${file} is empty`);
  } else if (flag !== undefined) {
    const program = basename(process.argv[1] ?? 'tidemark').replace(/\.js$/, '');
    process.stderr.write(`${program}: warning: ${TOKEN_ARGV_WARNING}\n`);
    token = flag;
  } else {
    token = process.env.TIDEMARK_TOKEN;
  }
  if (!token?.trim()) throw new TidemarkError('E_USAGE', 'no token: set TIDEMARK_TOKEN or pass --token-file FILE');
  return token.trim();
}

export function parseIntOption(name: string, min: number, max: number): (value: string) => number {
  return (value) => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min || n > max) throw new TidemarkError('E_USAGE', `${name} must be a whole number from ${min} to ${max}`);
    return n;
  };
}
