// Structured logs (pino, JSON lines) on stderr, so stdout stays free for the
// command's own output (`--json` documents, the demo's narration).
import { pino, destination, type Logger } from 'pino';

export type { Logger };

/** `defaultLevel`: services log `info`; one-shot commands only `warn` and worse, beside their human output. */
export function createLogger(component: string, defaultLevel: 'info' | 'warn' = 'info'): Logger {
  return pino(
    {
      name: component,
      level: process.env.TIDEMARK_LOG_LEVEL || defaultLevel,
      // Never log a secret even if a caller passes one by mistake.
      redact: { paths: ['credential', 'token', 'passphrase', '*.credential', '*.token', '*.passphrase'], censor: '[redacted]' },
    },
    destination({ fd: 2, sync: true }),
  );
}
