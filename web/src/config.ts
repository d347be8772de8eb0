/** `/web/config.json` from the gateway, kept in localStorage so the app also starts offline. */

export interface WebConfig {
  auth_url: string;
  native_path: string;
  collab_path: string;
  chat_rooms: string[];
  typing_prefix: string;
  editor_doc: string;
  ticker_prefix: string;
  ticker_symbols: string[];
  iot_channels: string[];
  /** A device the Board can send commands to (`mqtt.request`), and the channel of its state. */
  device?: { name: string; command_topic: string; state_channel: string };
  world_room: string;
  /** Device agents the Device view can call (`tsunagu device-agent`): their MQTT topics. */
  devices?: WebDevice[];
}

export interface WebDevice {
  device: string;
  command_topic: string;
  telemetry_topic?: string;
  ack_topic?: string;
}

const STORAGE_KEY = 'tsunagu.config';

export async function loadConfig(): Promise<WebConfig> {
  try {
    const response = await fetch('/web/config.json', { cache: 'no-store' });
    if (!response.ok) throw new Error(`GET /web/config.json: HTTP ${response.status}`);
    const config = (await response.json()) as WebConfig;
    localStorage.setItem(STORAGE_KEY, JSON.stringify(config));
    return config;
  } catch (error) {
    const stored = localStorage.getItem(STORAGE_KEY);
    if (stored) return JSON.parse(stored) as WebConfig;
    throw error;
  }
}

/** auth's base URL; `npm run dev` reaches it through the dev server's proxy (auth's CORS allows the gateway). */
export function authBase(config: WebConfig): string {
  return import.meta.env.DEV ? '/dev-auth' : config.auth_url.replace(/\/+$/, '');
}

/** ws(s)://host + path, on the page's own origin. */
export function wsUrl(path: string): string {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}${path}`;
}
