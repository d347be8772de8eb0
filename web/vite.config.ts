import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';
import { VitePWA } from 'vite-plugin-pwa';

// Where the ws-gateway runs during `npm run dev` (it serves /web/*, the WebSocket endpoints and /collab).
const gateway = process.env.TSUNAGU_GATEWAY ?? 'http://127.0.0.1:8080';
const here = (path: string): string => fileURLToPath(new URL(path, import.meta.url));

export default defineConfig({
  base: '/',
  resolve: {
    alias: { '@tsunagu/offline-client': here('../clients/js/src/index.ts') },
    // clients/js has its own node_modules (or none on a clean clone): use this app's single copy.
    dedupe: ['centrifuge', 'idb'],
  },
  server: {
    port: 5173,
    fs: { allow: [here('.'), here('../clients/js')] },
    proxy: {
      '/web': gateway,
      // auth only allows the gateway's origin (CORS): in development the app reaches it through here.
      '/dev-auth': { target: process.env.TSUNAGU_AUTH ?? 'http://127.0.0.1:8081', rewrite: (p) => p.slice(9) },
      '/connection': { target: gateway, ws: true },
      '/collab': { target: gateway, ws: true },
    },
  },
  build: {
    outDir: '../services/ws-gateway/src/tsunagu_ws_gateway/web',
    emptyOutDir: true,
    target: 'es2022',
    sourcemap: false,
    chunkSizeWarningLimit: 1000,
    // The operator console is a page of its own (/console/): admins only, none of the demo's views.
    rollupOptions: { input: { main: here('index.html'), console: here('console/index.html') } },
  },
  plugins: [
    VitePWA({
      strategies: 'generateSW',
      injectRegister: false, // main.ts registers /sw.js itself
      registerType: 'autoUpdate',
      manifest: {
        name: 'Tsunagu demo',
        short_name: 'Tsunagu',
        description: 'Chat, a shared editor, live tickers and a small world on the Tsunagu realtime platform.',
        start_url: '/',
        display: 'standalone',
        background_color: '#0f172a',
        theme_color: '#0f172a',
        icons: [{ src: '/icon.svg', sizes: 'any', type: 'image/svg+xml', purpose: 'any' }],
      },
      workbox: {
        globPatterns: ['**/*.{html,js,css,svg,webmanifest}'],
        navigateFallback: '/index.html',
        // Gateway endpoints are never the app shell.
        navigateFallbackDenylist: [/^\/(console|web|connection|collab|api|v1|healthz|readyz|metrics|socket\.io|stomp|graphql)/],
        skipWaiting: true,
        clientsClaim: true,
        cleanupOutdatedCaches: true,
        sourcemap: false,
        // The config is also kept in localStorage; this lets a reload offline find it too.
        runtimeCaching: [
          {
            urlPattern: ({ url }) => url.pathname === '/web/config.json',
            handler: 'NetworkFirst',
            options: { cacheName: 'tsunagu-config', networkTimeoutSeconds: 3 },
          },
        ],
      },
    }),
  ],
});
