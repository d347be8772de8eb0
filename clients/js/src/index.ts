export { OfflinePublisher, PUBLISH_RPC } from './publisher.js';
export type {
  ChangeEvent,
  OfflinePublisherEvent,
  OfflinePublisherEvents,
  OfflinePublisherOptions,
  RetryEvent,
} from './publisher.js';
export { classifyError, toPublishError, PERMANENT_CODES, TEMPORARY_CODES } from './errors.js';
export type { ErrorKind, PublishError } from './errors.js';
export type { Ack, CentrifugeLike, FailedPublication, LockManagerLike, QueuedPublication } from './types.js';
export { PeerLink, signalingChannel } from './webrtc.js';
export type { PeerLinkOptions, SignalingClient, SignalingSubscription } from './webrtc.js';
export { DeviceControl } from './device.js';
export type { CommandPath, DeviceControlOptions, TelemetrySample } from './device.js';
