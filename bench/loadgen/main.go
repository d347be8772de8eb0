// loadgen drives the gateway benchmarks against any server speaking the Centrifugo client protocol
// (JSON) and its HTTP server API, and counts every publication that reaches every subscriber: each
// subscriber checks the sequence numbers it receives, so lost, duplicated and reordered publications
// are counted, not only deliveries, and the publish time in each publication gives publish → deliver
// latency. With -server-pid it reads the server's CPU time (utime + stime from /proc) over the run.
//
//	loadgen -url ws://127.0.0.1:8080/connection/websocket -token T -clients 1000 -duration 10s
//	loadgen ... -publish http -api http://127.0.0.1:8080/api -apikey K -window 4   # server API publishes
//	loadgen ... -mode channels -clients 10000 -period 1s   # a channel per client plus one shared channel
//	loadgen -serve 127.0.0.1:18099   # the reference server: pre-encoded frames, the tool's own ceiling
//	loadgen -url http://127.0.0.1:8080/connection/uni_sse -token T -publish http ...   # SSE subscribers
//
// An -url on /connection/uni_sse makes the subscribers Server-Sent Events streams (Centrifugo's
// unidirectional SSE: the connect request in `cf_connect`, one `data:` event per push); their
// channels are the token's server-side subscriptions (its `subs` claim), and publishing is -publish http.
//
// With -proto socketio the subscribers and the publisher are Socket.IO v5 sockets (socketio.go) on
// -url ws://host/socket.io/: each joins the room -channel, the publisher emits `emit {room, event,
// args}` with an ack, as our gateway's /socket.io/ and a python-socketio server with the same two
// handlers take it (bench/socketio_fanout.py).
//
//	loadgen -proto socketio -url ws://127.0.0.1:8080/socket.io/ -token T -channel lobby -clients 1000
//
// It prints one JSON object with the result.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

type result struct {
	Proto           string  `json:"proto"`
	Mode            string  `json:"mode"`
	Publish         string  `json:"publish"`
	Window          int     `json:"window"`
	Clients         int     `json:"clients"`
	Published       int64   `json:"published"`
	Delivered       int64   `json:"delivered"`
	Expected        int64   `json:"expected"`
	Seconds         float64 `json:"seconds"`
	DeliveriesPerS  float64 `json:"deliveries_per_second"`
	PublishesPerS   float64 `json:"publishes_per_second"`
	ConnectSeconds  float64 `json:"connect_seconds"`
	PayloadBytes    int     `json:"payload_bytes"`
	Compression     bool    `json:"compression"`
	WireBytes       int64   `json:"wire_bytes_received"`
	Messages        int64   `json:"messages_received"`
	ServerCPU       float64 `json:"server_cpu_seconds"`
	PerCPUSecond    float64 `json:"deliveries_per_server_cpu_second"`
	MicrosPerDeliv  float64 `json:"server_cpu_us_per_delivery"`
	LatencyP50ms    float64 `json:"latency_p50_ms"`
	LatencyP99ms    float64 `json:"latency_p99_ms"`
	LatencyMaxms    float64 `json:"latency_max_ms"`
	DisconnectedMid int64   `json:"disconnected_during_run"`
	Lost            int64   `json:"lost"`
	Duplicated      int64   `json:"duplicated"`
	OutOfOrder      int64   `json:"out_of_order"`
	SubscribersHurt int64   `json:"subscribers_with_a_problem"`
	PerClientMin    int64   `json:"per_client_received_min"`
	PerClientMax    int64   `json:"per_client_received_max"`
	PublishErrors   int64   `json:"publish_errors"`
}

// firstSeq is the id (and sequence number) of the first publish command.
const firstSeq = 10

// ledger is one subscriber's record of the sequence numbers it received.
type ledger struct {
	seen       []uint64 // bit set over seq - firstSeq
	received   int64    // publications received (duplicates included)
	last       []int64  // the last sequence number per publishing worker: each worker's are in order
	duplicated int64
	outOfOrder int64
}

var (
	seqMarker = []byte(`"seq":`)
	pubMarker = []byte(`"pub":`)
)

// number reads the digits at the start of data after `prefix` (`,"w":`): the value and the rest.
func number(data []byte, prefix string) (int64, []byte, bool) {
	if !bytes.HasPrefix(data, []byte(prefix)) {
		return 0, data, false
	}
	data = data[len(prefix):]
	var value int64
	digits := 0
	for digits < len(data) && data[digits] >= '0' && data[digits] <= '9' {
		value = value*10 + int64(data[digits]-'0')
		digits++
	}
	return value, data[digits:], digits > 0
}

// record notes every `"seq":N,"w":K,"t":T` in one message (several publications may share it).
func (l *ledger) record(data []byte, now int64) {
	for {
		at := bytes.Index(data, seqMarker)
		if at < 0 {
			return
		}
		seq, rest, ok := number(data[at:], `"seq":`)
		data = rest
		if !ok || seq < firstSeq {
			continue
		}
		l.received++
		worker, rest, _ := number(data, `,"w":`)
		data = rest
		if sent, rest, ok := number(data, `,"t":`); ok {
			data = rest
			latencies.observe(now - sent)
		}
		index := uint64(seq - firstSeq)
		for uint64(len(l.seen))*64 <= index {
			l.seen = append(l.seen, 0)
		}
		word, bit := index/64, uint64(1)<<(index%64)
		if l.seen[word]&bit != 0 {
			l.duplicated++
			continue
		}
		l.seen[word] |= bit
		for int64(len(l.last)) <= worker {
			l.last = append(l.last, 0)
		}
		if seq < l.last[worker] {
			l.outOfOrder++
		}
		l.last[worker] = seq
	}
}

// missing counts the sequence numbers in `want` this subscriber never received.
func (l *ledger) missing(want func(yield func(int64))) int64 {
	var count int64
	want(func(seq int64) {
		index := uint64(seq - firstSeq)
		if index/64 >= uint64(len(l.seen)) || l.seen[index/64]&(uint64(1)<<(index%64)) == 0 {
			count++
		}
	})
	return count
}

// histogram of latencies in microseconds: 10 µs buckets to 100 ms, then 1 ms buckets to 10 s.
type histogram struct {
	fine   [10_000]atomic.Int64
	coarse [10_000]atomic.Int64
	over   atomic.Int64
	max    atomic.Int64
}

var latencies histogram

func (h *histogram) observe(nanos int64) {
	micros := nanos / 1000
	if micros < 0 {
		micros = 0
	}
	for {
		current := h.max.Load()
		if micros <= current || h.max.CompareAndSwap(current, micros) {
			break
		}
	}
	switch {
	case micros < 100_000:
		h.fine[micros/10].Add(1)
	case micros < 10_000_000:
		h.coarse[micros/1000].Add(1)
	default:
		h.over.Add(1)
	}
}

func (h *histogram) quantile(q float64) float64 {
	var total int64
	for i := range h.fine {
		total += h.fine[i].Load()
	}
	for i := range h.coarse {
		total += h.coarse[i].Load()
	}
	total += h.over.Load()
	if total == 0 {
		return 0
	}
	rank := int64(q * float64(total))
	var seen int64
	for i := range h.fine {
		if seen += h.fine[i].Load(); seen > rank {
			return float64(i*10+10) / 1000
		}
	}
	for i := range h.coarse {
		if seen += h.coarse[i].Load(); seen > rank {
			return float64(i + 1)
		}
	}
	return float64(h.max.Load()) / 1000
}

// serverCPU is the server's utime + stime in seconds (0 without -server-pid).
func serverCPU(pid int) float64 {
	if pid == 0 {
		return 0
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces: count fields after its closing parenthesis.
	fields := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	utime, _ := strconv.ParseFloat(fields[11], 64)
	stime, _ := strconv.ParseFloat(fields[12], 64)
	return (utime + stime) / 100 // USER_HZ
}

// countingConn counts the bytes a client reads off its socket (compressed or not).
type countingConn struct {
	net.Conn
}

var wireBytes atomic.Int64

func (c countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	wireBytes.Add(int64(n))
	return n, err
}

// tlsConfig verifies wss:// servers (set by -ca); nil: the system roots.
var (
	tlsConfig *tls.Config
	compress  bool
)

func dial(url string) (*websocket.Conn, error) {
	dialer := websocket.Dialer{
		HandshakeTimeout:  10 * time.Second,
		ReadBufferSize:    64 << 10,
		TLSClientConfig:   tlsConfig,
		EnableCompression: compress,
		NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return countingConn{conn}, nil
		},
	}
	conn, _, err := dialer.Dial(url, http.Header{})
	return conn, err
}

// stream is one subscriber's connection: a WebSocket, or an SSE response (sseConn).
type stream interface {
	ReadMessage() (int, []byte, error)
	WriteMessage(int, []byte) error
	Close() error
}

// sseConn reads a uni_sse response: each `data:` line is one message (ids and blank lines skipped).
type sseConn struct {
	body   io.ReadCloser
	reader *bufio.Reader
}

var sseClient = &http.Client{Transport: &http.Transport{DisableCompression: true, MaxConnsPerHost: 0}}

type countingReader struct{ io.Reader }

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.Reader.Read(p)
	wireBytes.Add(int64(n))
	return n, err
}

func dialSSE(endpoint, token string) (*sseConn, error) {
	connect := url.QueryEscape(fmt.Sprintf(`{"token":%q}`, token))
	resp, err := sseClient.Get(endpoint + "?cf_connect=" + connect)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("uni_sse answered %s", resp.Status)
	}
	conn := &sseConn{body: resp.Body, reader: bufio.NewReaderSize(countingReader{resp.Body}, 64<<10)}
	_, first, err := conn.ReadMessage()
	if err != nil {
		conn.Close()
		return nil, err
	}
	if !bytes.HasPrefix(first, []byte(`{"connect"`)) {
		conn.Close()
		return nil, fmt.Errorf("server refused: %s", first)
	}
	return conn, nil
}

func (c *sseConn) ReadMessage() (int, []byte, error) {
	for {
		line, err := c.reader.ReadSlice('\n')
		if err != nil {
			return 0, nil, err
		}
		if bytes.HasPrefix(line, []byte("data: ")) {
			return websocket.TextMessage, bytes.TrimRight(line[len("data: "):], "\r\n"), nil
		}
	}
}

func (c *sseConn) WriteMessage(int, []byte) error { return nil } // pings need no answer
func (c *sseConn) Close() error                   { return c.body.Close() }

// handshake sends connect and the subscribes in one message and waits for every reply.
func handshake(conn *websocket.Conn, token string, channels ...string) error {
	commands := []string{fmt.Sprintf(`{"id":1,"connect":{"token":%q}}`, token)}
	for i, channel := range channels {
		commands = append(commands, fmt.Sprintf(`{"id":%d,"subscribe":{"channel":%q}}`, i+2, channel))
	}
	if err := conn.WriteMessage(websocket.TextMessage, []byte(strings.Join(commands, "\n"))); err != nil {
		return err
	}
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	defer func() { _ = conn.SetReadDeadline(time.Time{}) }()
	replies := 0
	for replies < len(commands) {
		_, data, err := conn.ReadMessage()
		if err != nil {
			return err
		}
		for _, line := range bytes.Split(data, []byte("\n")) {
			if bytes.Contains(line, []byte(`"error"`)) {
				return fmt.Errorf("server refused: %s", line)
			}
			if bytes.HasPrefix(line, []byte(`{"id":`)) {
				replies++
			}
		}
	}
	return nil
}

// subscribers connects `clients` clients, 64 dialing at once; channels(i) are client i's channels.
func subscribers(url, token string, clients int, channels func(int) []string) ([]stream, float64, error) {
	conns := make([]stream, clients)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	sem := make(chan struct{}, 64)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			if socketIO() {
				conn, err := dialSocketIO(url, token, channels(i)...)
				if err != nil {
					errs <- err
					return
				}
				conns[i] = conn
				return
			}
			if strings.Contains(url, "/uni_sse") {
				conn, err := dialSSE(url, token)
				if err != nil {
					errs <- err
					return
				}
				conns[i] = conn
				return
			}
			conn, err := dial(url)
			if err == nil {
				err = handshake(conn, token, channels(i)...)
			}
			if err != nil {
				errs <- err
				return
			}
			conns[i] = conn
		}(i)
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, 0, fmt.Errorf("connecting subscribers: %w", err)
	}
	return conns, time.Since(start).Seconds(), nil
}

// protocol is what the readers need to know of the wire protocol.
type protocol interface {
	deliveries(msg []byte) int // publications in one message
	answer(msg []byte) []byte  // the reply to a server ping, or nil
}

type centrifugoProtocol struct{}

func (centrifugoProtocol) deliveries(msg []byte) int { return bytes.Count(msg, pubMarker) }

func (centrifugoProtocol) answer(msg []byte) []byte {
	if bytes.Equal(msg, []byte("{}")) {
		return msg
	}
	return nil
}

// wire is -proto: centrifugoProtocol or socketIOProtocol.
var wire protocol = centrifugoProtocol{}

func socketIO() bool { _, ok := wire.(socketIOProtocol); return ok }

// readers reads every subscriber until it closes, answering the protocol's pings.
type readers struct {
	ledgers      []ledger
	delivered    atomic.Int64
	messages     atomic.Int64
	disconnected atomic.Int64
	last         atomic.Int64
	running      atomic.Bool
	wg           sync.WaitGroup
}

func startReaders(conns []stream) *readers {
	r := &readers{ledgers: make([]ledger, len(conns))}
	r.running.Store(true)
	for i, conn := range conns {
		r.wg.Add(1)
		go func(conn stream, book *ledger) {
			defer r.wg.Done()
			for {
				_, data, err := conn.ReadMessage()
				if err != nil {
					if r.running.Load() {
						r.disconnected.Add(1)
					}
					return
				}
				r.messages.Add(1)
				if n := wire.deliveries(data); n > 0 {
					now := time.Now().UnixNano()
					r.delivered.Add(int64(n))
					r.last.Store(now)
					book.record(data, now)
				}
				if reply := wire.answer(data); reply != nil {
					_ = conn.WriteMessage(websocket.TextMessage, reply)
				}
			}
		}(conn, &r.ledgers[i])
	}
	return r
}

// drain waits for `expected` deliveries (at most 15 s), then closes every subscriber.
func (r *readers) drain(conns []stream, expected int64) {
	until := time.Now().Add(15 * time.Second)
	for r.delivered.Load() < expected && time.Now().Before(until) {
		time.Sleep(10 * time.Millisecond)
	}
	r.running.Store(false)
	for _, conn := range conns {
		conn.Close()
	}
	r.wg.Wait()
}

// publisher sends publications with at most `window` in flight, each worker's in order.
type publisher interface {
	// publish sends one publication from worker `w` and returns once the server acknowledged it.
	publish(w int, channel string, seq int64) error
	batch(channels []string, seqs []int64, workers []int) error
	close()
}

func payload(seq int64, w int, body string) string {
	return fmt.Sprintf(`{"seq":%d,"w":%d,"t":%d,"text":%q}`, seq, w, time.Now().UnixNano(), body)
}

// wsPublisher publishes with the client protocol's publish command on one connection.
type wsPublisher struct {
	conn    *websocket.Conn
	body    string
	mu      sync.Mutex
	waiting map[int64]chan error
	gone    chan struct{}
	err     error
}

func newWSPublisher(url, token, channel, body string) (*wsPublisher, error) {
	conn, err := dial(url)
	if err != nil {
		return nil, err
	}
	if err := handshake(conn, token, channel+"-publisher"); err != nil {
		return nil, err
	}
	p := &wsPublisher{conn: conn, body: body, waiting: map[int64]chan error{}, gone: make(chan struct{})}
	go func() {
		defer close(p.gone)
		for {
			_, data, err := conn.ReadMessage()
			if err != nil {
				p.err = err
				return
			}
			for _, line := range bytes.Split(data, []byte("\n")) {
				if bytes.Equal(line, []byte("{}")) {
					_ = conn.WriteMessage(websocket.TextMessage, []byte("{}"))
					continue
				}
				id, _, ok := number(line, `{"id":`)
				if !ok {
					continue
				}
				p.mu.Lock()
				done := p.waiting[id]
				delete(p.waiting, id)
				p.mu.Unlock()
				if done != nil {
					if bytes.Contains(line, []byte(`"error"`)) {
						done <- fmt.Errorf("%s", line)
					} else {
						done <- nil
					}
				}
			}
		}
	}()
	return p, nil
}

func (p *wsPublisher) publish(w int, channel string, seq int64) error {
	done := make(chan error, 1)
	p.mu.Lock()
	p.waiting[seq] = done
	cmd := fmt.Sprintf(`{"id":%d,"publish":{"channel":%q,"data":%s}}`, seq, channel, payload(seq, w, p.body))
	err := p.conn.WriteMessage(websocket.TextMessage, []byte(cmd))
	p.mu.Unlock()
	if err != nil {
		return err
	}
	select {
	case err := <-done:
		return err
	case <-p.gone:
		return fmt.Errorf("the server closed the publisher's connection: %v", p.err)
	}
}

func (p *wsPublisher) batch(channels []string, seqs []int64, workers []int) error {
	for i, channel := range channels {
		if err := p.publish(workers[i], channel, seqs[i]); err != nil {
			return err
		}
	}
	return nil
}

func (p *wsPublisher) close() { p.conn.Close() }

// httpPublisher publishes through the server API (`POST <api>/publish`, `<api>/batch`).
type httpPublisher struct {
	api, key, body string
	client         *http.Client
}

func newHTTPPublisher(api, key, body string, window int) *httpPublisher {
	transport := &http.Transport{MaxIdleConns: window * 2, MaxIdleConnsPerHost: window * 2, TLSClientConfig: tlsConfig}
	return &httpPublisher{api: api, key: key, body: body, client: &http.Client{Transport: transport, Timeout: 30 * time.Second}}
}

func (p *httpPublisher) call(method, body string) error {
	request, err := http.NewRequest(http.MethodPost, p.api+"/"+method, strings.NewReader(body))
	if err != nil {
		return err
	}
	request.Header.Set("X-API-Key", p.key)
	request.Header.Set("Content-Type", "application/json")
	response, err := p.client.Do(request)
	if err != nil {
		return err
	}
	defer response.Body.Close()
	answer, err := io.ReadAll(response.Body)
	if err != nil {
		return err
	}
	if response.StatusCode != http.StatusOK || bytes.Contains(answer, []byte(`"error"`)) {
		return fmt.Errorf("%s: %d %s", method, response.StatusCode, answer)
	}
	return nil
}

func (p *httpPublisher) publish(w int, channel string, seq int64) error {
	return p.call("publish", fmt.Sprintf(`{"channel":%q,"data":%s}`, channel, payload(seq, w, p.body)))
}

func (p *httpPublisher) batch(channels []string, seqs []int64, workers []int) error {
	commands := make([]string, len(channels))
	for i, channel := range channels {
		commands[i] = fmt.Sprintf(`{"publish":{"channel":%q,"data":%s}}`, channel, payload(seqs[i], workers[i], p.body))
	}
	return p.call("batch", `{"commands":[`+strings.Join(commands, ",")+`]}`)
}

func (p *httpPublisher) close() {}

type config struct {
	url, token, channel, publish, api, apiKey, proto string
	clients, payload, window, serverPID              int
	duration, period                                 time.Duration
}

func (c config) publisher(body string) (publisher, error) {
	if socketIO() {
		return newSIOPublisher(c.url, c.token, body)
	}
	if c.publish == "http" {
		return newHTTPPublisher(c.api, c.apiKey, body, c.window), nil
	}
	return newWSPublisher(c.url, c.token, c.channel, body)
}

func finish(c config, res *result, r *readers, wanted func(int) func(yield func(int64))) {
	res.Delivered = r.delivered.Load()
	res.Messages = r.messages.Load()
	res.WireBytes = wireBytes.Load()
	res.DisconnectedMid = r.disconnected.Load()
	res.Compression = compress
	res.PayloadBytes = c.payload
	res.Clients = c.clients
	res.Window = c.window
	res.Publish = c.publish
	res.Proto = c.proto
	if socketIO() {
		res.Publish = "socketio emit"
	}
	if res.ServerCPU > 0 {
		res.PerCPUSecond = float64(res.Delivered) / res.ServerCPU
		res.MicrosPerDeliv = res.ServerCPU * 1e6 / float64(max(res.Delivered, 1))
	}
	res.LatencyP50ms = latencies.quantile(0.50)
	res.LatencyP99ms = latencies.quantile(0.99)
	res.LatencyMaxms = float64(latencies.max.Load()) / 1000
	for i := range r.ledgers {
		book := &r.ledgers[i]
		missing := book.missing(wanted(i))
		res.Lost += missing
		res.Duplicated += book.duplicated
		res.OutOfOrder += book.outOfOrder
		if i == 0 || book.received < res.PerClientMin {
			res.PerClientMin = book.received
		}
		res.PerClientMax = max(res.PerClientMax, book.received)
		if missing > 0 || book.duplicated > 0 || book.outOfOrder > 0 {
			res.SubscribersHurt++
		}
	}
}

// start connects the subscribers (client i on channels(i)), starts their readers and the publisher.
func (c config) start(channels func(int) []string) ([]stream, float64, *readers, publisher, error) {
	conns, connectSeconds, err := subscribers(c.url, c.token, c.clients, channels)
	if err != nil {
		return nil, 0, nil, nil, err
	}
	log.Printf("%d subscribers connected in %.2fs", c.clients, connectSeconds)
	r := startReaders(conns)
	pub, err := c.publisher(strings.Repeat("x", max(c.payload-70, 1)))
	if err != nil {
		return nil, 0, nil, nil, err
	}
	return conns, connectSeconds, r, pub, nil
}

// broadcast: every client on one channel; `window` publishes in flight, as fast as acks come back.
func broadcast(c config) (*result, error) {
	conns, connectSeconds, r, pub, err := c.start(func(int) []string { return []string{c.channel} })
	if err != nil {
		return nil, err
	}
	defer pub.close()
	var next, published, failed atomic.Int64
	next.Store(firstSeq)
	cpuStart := serverCPU(c.serverPID)
	start := time.Now()
	deadline := start.Add(c.duration)
	var workers sync.WaitGroup
	errs := make(chan error, c.window)
	var sendMu sync.Mutex // over WebSocket, ids go out in sequence order
	for w := 0; w < c.window; w++ {
		workers.Add(1)
		go func(w int) {
			defer workers.Done()
			for time.Now().Before(deadline) {
				sendMu.Lock()
				seq := next.Add(1) - 1
				var err error
				if ws, ok := pub.(*wsPublisher); ok {
					// hold the lock only while writing, not while waiting for the ack
					done := make(chan error, 1)
					ws.mu.Lock()
					ws.waiting[seq] = done
					cmd := fmt.Sprintf(`{"id":%d,"publish":{"channel":%q,"data":%s}}`, seq, c.channel, payload(seq, 0, ws.body))
					err = ws.conn.WriteMessage(websocket.TextMessage, []byte(cmd))
					ws.mu.Unlock()
					sendMu.Unlock()
					if err == nil {
						select {
						case err = <-done:
						case <-ws.gone:
							err = fmt.Errorf("the server closed the publisher's connection: %v", ws.err)
						}
					}
				} else {
					sendMu.Unlock()
					err = pub.publish(w, c.channel, seq)
				}
				published.Add(1)
				if err != nil {
					failed.Add(1)
					select {
					case errs <- err:
					default:
					}
					return
				}
			}
		}(w)
	}
	workers.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	total := published.Load()
	expected := total * int64(c.clients)
	log.Printf("published %d, waiting for %d deliveries", total, expected)
	r.drain(conns, expected)
	cpuEnd := serverCPU(c.serverPID)
	seconds := time.Unix(0, r.last.Load()).Sub(start).Seconds()
	res := &result{
		Mode: "broadcast", Published: total, Expected: expected, Seconds: seconds,
		DeliveriesPerS: float64(r.delivered.Load()) / seconds, PublishesPerS: float64(total) / c.duration.Seconds(),
		ConnectSeconds: connectSeconds, ServerCPU: cpuEnd - cpuStart, PublishErrors: failed.Load(),
	}
	finish(c, res, r, func(int) func(yield func(int64)) {
		return func(yield func(int64)) {
			for seq := int64(firstSeq); seq < firstSeq+total; seq++ {
				yield(seq)
			}
		}
	})
	return res, nil
}

// channels: client i on its own channel and on one shared channel; every channel is published once
// per `period`, the personal ones spread over it in batches every 10 ms (a round), the shared one at
// the start of each round. Worker 0 publishes the personal channels, worker 1 the shared one.
func channels(c config) (*result, error) {
	own := func(i int) string { return fmt.Sprintf("%s.c%d", c.channel, i) }
	shared := c.channel + ".all"
	conns, connectSeconds, r, pub, err := c.start(func(i int) []string { return []string{own(i), shared} })
	if err != nil {
		return nil, err
	}
	defer pub.close()
	const tick = 10 * time.Millisecond
	ticks := int(c.period / tick)
	perTick := (c.clients + ticks - 1) / ticks
	rounds := int(c.duration / c.period)
	// round k's publication on any channel has seq firstSeq + 2k (personal) or firstSeq + 2k + 1 (shared)
	var published, failed atomic.Int64
	inFlight := make(chan struct{}, 8)
	var calls sync.WaitGroup
	cpuStart := serverCPU(c.serverPID)
	start := time.Now()
	for k := 0; k < rounds; k++ {
		for t := 0; t < ticks; t++ {
			at := start.Add(time.Duration(k)*c.period + time.Duration(t)*tick)
			time.Sleep(time.Until(at))
			var names []string
			var seqs []int64
			var workers []int
			if t == 0 {
				names, seqs, workers = append(names, shared), append(seqs, int64(firstSeq+2*k+1)), append(workers, 1)
			}
			for i := t * perTick; i < min((t+1)*perTick, c.clients); i++ {
				names, seqs, workers = append(names, own(i)), append(seqs, int64(firstSeq+2*k)), append(workers, 0)
			}
			if len(names) == 0 {
				continue
			}
			inFlight <- struct{}{}
			calls.Add(1)
			go func(names []string, seqs []int64, workers []int) {
				defer calls.Done()
				defer func() { <-inFlight }()
				if err := pub.batch(names, seqs, workers); err != nil {
					failed.Add(1)
					log.Printf("publish: %v", err)
					return
				}
				published.Add(int64(len(names)))
			}(names, seqs, workers)
		}
	}
	calls.Wait()
	expected := int64(rounds) * int64(2*c.clients)
	log.Printf("published %d, waiting for %d deliveries", published.Load(), expected)
	r.drain(conns, expected)
	cpuEnd := serverCPU(c.serverPID)
	seconds := time.Since(start).Seconds()
	res := &result{
		Mode: "channels", Published: published.Load(), Expected: expected, Seconds: seconds,
		DeliveriesPerS: float64(r.delivered.Load()) / seconds, PublishesPerS: float64(published.Load()) / seconds,
		ConnectSeconds: connectSeconds, ServerCPU: cpuEnd - cpuStart, PublishErrors: failed.Load(),
	}
	finish(c, res, r, func(int) func(yield func(int64)) {
		return func(yield func(int64)) {
			for seq := int64(firstSeq); seq < int64(firstSeq+2*rounds); seq++ {
				yield(seq)
			}
		}
	})
	return res, nil
}

func main() {
	serve := flag.String("serve", "", "run the reference broadcast server on this address instead")
	var c config
	flag.StringVar(&c.url, "url", "ws://127.0.0.1:8080/connection/websocket", "server WebSocket URL")
	flag.StringVar(&c.proto, "proto", "centrifugo", "centrifugo: its JSON client protocol; socketio: Socket.IO v5 (rooms, emit with ack)")
	flag.StringVar(&c.token, "token", "", "connection token (JWT)")
	flag.IntVar(&c.clients, "clients", 1000, "subscribers")
	flag.StringVar(&c.channel, "channel", "bench", "channel (in -mode channels, the prefix of every channel)")
	flag.DurationVar(&c.duration, "duration", 10*time.Second, "how long the publisher publishes")
	flag.IntVar(&c.payload, "payload", 200, "approximate publication size in bytes")
	flag.IntVar(&c.window, "window", 8, "publishes in flight")
	flag.StringVar(&c.publish, "publish", "ws", "ws: the client protocol's publish command; http: the server API")
	flag.StringVar(&c.api, "api", "", "server API base URL for -publish http (http://host:port/api)")
	flag.StringVar(&c.apiKey, "apikey", "", "server API key (X-API-Key)")
	flag.IntVar(&c.serverPID, "server-pid", 0, "the server's pid: its CPU time over the run is reported")
	mode := flag.String("mode", "broadcast", "broadcast: one channel; channels: a channel per client plus a shared one")
	flag.DurationVar(&c.period, "period", time.Second, "in -mode channels, every channel is published once per period")
	flag.BoolVar(&compress, "compress", false, "offer permessage-deflate (gorilla: no context takeover)")
	idle := flag.Duration("idle", 0, "only connect the clients (no subscription), hold them this long, then exit")
	caFile := flag.String("ca", "", "PEM file of the CA that signed a wss:// server's certificate")
	flag.Parse()
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			log.Fatal(err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			log.Fatalf("%s: no PEM certificate", *caFile)
		}
		tlsConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	switch c.proto {
	case "centrifugo":
	case "socketio":
		wire = socketIOProtocol{}
		if *mode != "broadcast" || *idle > 0 {
			log.Fatal("-proto socketio runs -mode broadcast only")
		}
	default:
		log.Fatalf("unknown -proto %q", c.proto)
	}
	if *serve != "" {
		serveReference(*serve)
		return
	}
	if *idle > 0 {
		if err := holdIdle(c.url, c.token, c.clients, *idle); err != nil {
			log.Fatal(err)
		}
		return
	}
	var res *result
	var err error
	switch *mode {
	case "broadcast":
		res, err = broadcast(c)
	case "channels":
		res, err = channels(c)
	default:
		err = fmt.Errorf("unknown -mode %q", *mode)
	}
	if err != nil {
		log.Fatal(err)
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}

// holdIdle connects authenticated clients that do nothing else, prints "ready" and holds them, so
// the caller can read the server's memory per idle connection.
func holdIdle(url, token string, clients int, hold time.Duration) error {
	conns := make([]*websocket.Conn, 0, clients)
	start := time.Now()
	for i := 0; i < clients; i++ {
		conn, err := dial(url)
		if err != nil {
			return fmt.Errorf("client %d: %w", i, err)
		}
		if err := handshake(conn, token); err != nil {
			return fmt.Errorf("client %d not connected: %w", i, err)
		}
		go func(conn *websocket.Conn) {
			for {
				_, data, err := conn.ReadMessage()
				if err != nil {
					return
				}
				if bytes.Equal(data, []byte("{}")) {
					_ = conn.WriteMessage(websocket.TextMessage, []byte("{}"))
				}
			}
		}(conn)
		conns = append(conns, conn)
	}
	fmt.Printf("{\"ready\":true,\"clients\":%d,\"connect_seconds\":%.2f}\n", clients, time.Since(start).Seconds())
	os.Stdout.Sync()
	time.Sleep(hold)
	for _, conn := range conns {
		conn.Close()
	}
	return nil
}

// serveReference is the tool's ceiling: a server that does the least a broadcast server can do,
// encoding each publication once and writing the same bytes to every subscriber.
func serveReference(addr string) {
	upgrader := websocket.Upgrader{ReadBufferSize: 4096, WriteBufferSize: 64 << 10}
	var mu sync.Mutex
	type subscriber struct {
		out     chan []byte
		channel string
	}
	subscribers := map[*websocket.Conn]subscriber{}
	offset := 0
	http.HandleFunc("/connection/websocket", func(w http.ResponseWriter, r *http.Request) {
		conn, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		out := make(chan []byte, 4096)
		go func() {
			// Coalesce whatever is queued into one message, as a production server does.
			for frame := range out {
				batch := append([]byte(nil), frame...)
			drain:
				for {
					select {
					case next := <-out:
						batch = append(append(batch, '\n'), next...)
					default:
						break drain
					}
				}
				if conn.WriteMessage(websocket.TextMessage, batch) != nil {
					return
				}
			}
		}()
		defer func() {
			mu.Lock()
			delete(subscribers, conn)
			mu.Unlock()
			conn.Close()
		}()
		for {
			_, data, err := conn.ReadMessage()
			if err != nil {
				return
			}
			for _, line := range bytes.Split(data, []byte("\n")) {
				var cmd map[string]json.RawMessage
				if json.Unmarshal(line, &cmd) != nil {
					continue
				}
				id := string(cmd["id"])
				switch {
				case cmd["connect"] != nil:
					out <- []byte(`{"id":` + id + `,"connect":{"client":"x","version":"ref"}}`)
				case cmd["subscribe"] != nil:
					var subscribe struct {
						Channel string `json:"channel"`
					}
					_ = json.Unmarshal(cmd["subscribe"], &subscribe)
					mu.Lock()
					subscribers[conn] = subscriber{out, subscribe.Channel}
					mu.Unlock()
					out <- []byte(`{"id":` + id + `,"subscribe":{}}`)
				case cmd["publish"] != nil:
					var publish struct {
						Channel string          `json:"channel"`
						Data    json.RawMessage `json:"data"`
					}
					_ = json.Unmarshal(cmd["publish"], &publish)
					mu.Lock()
					offset++
					frame := []byte(fmt.Sprintf(`{"push":{"channel":%q,"pub":{"data":%s,"offset":%d}}}`, publish.Channel, publish.Data, offset))
					for _, sub := range subscribers {
						if sub.channel == publish.Channel {
							select {
							case sub.out <- frame:
							default:
							}
						}
					}
					mu.Unlock()
					out <- []byte(`{"id":` + id + `,"publish":{}}`)
				}
			}
		}
	})
	log.SetOutput(os.Stderr)
	log.Fatal(http.ListenAndServe(addr, nil))
}
