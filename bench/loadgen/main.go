// loadgen drives the broadcast benchmark: N subscribers on one channel of a server speaking the
// Centrifugo client protocol (JSON), one publisher sending publish commands with a bounded window,
// and a count of every publication that reaches every subscriber: each subscriber checks the sequence
// numbers it receives, so lost, duplicated and reordered publications are counted, not only deliveries.
//
//	loadgen -url ws://127.0.0.1:8080/connection/websocket -token T -clients 1000 -duration 10s
//	loadgen -serve 127.0.0.1:18099   # the reference server: pre-encoded frames, the tool's own ceiling
//
// It prints one JSON object with the result.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

type result struct {
	Clients         int     `json:"clients"`
	Published       int64   `json:"published"`
	Delivered       int64   `json:"delivered"`
	Expected        int64   `json:"expected"`
	Seconds         float64 `json:"seconds"`
	DeliveriesPerS  float64 `json:"deliveries_per_second"`
	PublishesPerS   float64 `json:"publishes_per_second"`
	ConnectSeconds  float64 `json:"connect_seconds"`
	PayloadBytes    int     `json:"payload_bytes"`
	DisconnectedMid int64   `json:"disconnected_during_run"`
	Lost            int64   `json:"lost"`
	Duplicated      int64   `json:"duplicated"`
	OutOfOrder      int64   `json:"out_of_order"`
	SubscribersHurt int64   `json:"subscribers_with_a_problem"`
}

// firstSeq is the id (and sequence number) of the first publish command.
const firstSeq = 10

// ledger is one subscriber's record of the sequence numbers it received.
type ledger struct {
	seen       []uint64 // bit set over seq - firstSeq
	last       int64
	duplicated int64
	outOfOrder int64
}

var seqMarker = []byte(`"seq":`)

// record notes every `"seq":N` in one message (several publications may share it).
func (l *ledger) record(data []byte) {
	for {
		at := bytes.Index(data, seqMarker)
		if at < 0 {
			return
		}
		data = data[at+len(seqMarker):]
		var seq int64
		digits := 0
		for digits < len(data) && data[digits] >= '0' && data[digits] <= '9' {
			seq = seq*10 + int64(data[digits]-'0')
			digits++
		}
		data = data[digits:]
		if digits == 0 || seq < firstSeq {
			continue
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
		if seq < l.last {
			l.outOfOrder++
		}
		l.last = seq
	}
}

func (l *ledger) received(published int64) int64 {
	var count int64
	for index := uint64(0); index < uint64(published); index++ {
		if index/64 < uint64(len(l.seen)) && l.seen[index/64]&(uint64(1)<<(index%64)) != 0 {
			count++
		}
	}
	return count
}

func main() {
	serve := flag.String("serve", "", "run the reference broadcast server on this address instead")
	url := flag.String("url", "ws://127.0.0.1:8080/connection/websocket", "server WebSocket URL")
	token := flag.String("token", "", "connection token (JWT)")
	clients := flag.Int("clients", 1000, "subscribers")
	channel := flag.String("channel", "bench", "channel")
	duration := flag.Duration("duration", 10*time.Second, "how long the publisher publishes")
	payload := flag.Int("payload", 200, "approximate publication size in bytes")
	window := flag.Int("window", 8, "publish commands in flight")
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
	if *serve != "" {
		serveReference(*serve)
		return
	}
	if *idle > 0 {
		if err := holdIdle(*url, *token, *clients, *idle); err != nil {
			log.Fatal(err)
		}
		return
	}
	res, err := run(*url, *token, *clients, *channel, *duration, *payload, *window)
	if err != nil {
		log.Fatal(err)
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}

var pubMarker = []byte(`"pub":`)

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
		frame := fmt.Sprintf(`{"id":1,"connect":{"token":%q}}`, token)
		if err := conn.WriteMessage(websocket.TextMessage, []byte(frame)); err != nil {
			return err
		}
		_ = conn.SetReadDeadline(time.Now().Add(15 * time.Second))
		if _, data, err := conn.ReadMessage(); err != nil || !bytes.Contains(data, []byte(`"connect"`)) {
			return fmt.Errorf("client %d not connected: %v %s", i, err, data)
		}
		_ = conn.SetReadDeadline(time.Time{})
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

// tlsConfig verifies wss:// servers (set by -ca); nil: the system roots.
var tlsConfig *tls.Config

func dial(url string) (*websocket.Conn, error) {
	dialer := websocket.Dialer{HandshakeTimeout: 10 * time.Second, ReadBufferSize: 64 << 10, TLSClientConfig: tlsConfig}
	conn, _, err := dialer.Dial(url, http.Header{})
	return conn, err
}

// handshake sends connect and subscribe and waits for both replies.
func handshake(conn *websocket.Conn, token, channel string) error {
	frame := fmt.Sprintf(`{"id":1,"connect":{"token":%q}}`+"\n"+`{"id":2,"subscribe":{"channel":%q}}`, token, channel)
	if err := conn.WriteMessage(websocket.TextMessage, []byte(frame)); err != nil {
		return err
	}
	_ = conn.SetReadDeadline(time.Now().Add(15 * time.Second))
	defer func() { _ = conn.SetReadDeadline(time.Time{}) }()
	replies := 0
	for replies < 2 {
		_, data, err := conn.ReadMessage()
		if err != nil {
			return err
		}
		for _, line := range bytes.Split(data, []byte("\n")) {
			if bytes.Contains(line, []byte(`"error"`)) {
				return fmt.Errorf("server refused: %s", line)
			}
			if bytes.HasPrefix(line, []byte(`{"id":1`)) || bytes.HasPrefix(line, []byte(`{"id":2`)) {
				replies++
			}
		}
	}
	return nil
}

func run(url, token string, clients int, channel string, duration time.Duration, payload, window int) (*result, error) {
	var delivered, disconnected atomic.Int64
	var lastDelivery atomic.Int64
	conns := make([]*websocket.Conn, clients)
	connectStart := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	sem := make(chan struct{}, 64)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			conn, err := dial(url)
			if err == nil {
				err = handshake(conn, token, channel)
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
		return nil, fmt.Errorf("connecting subscribers: %w", err)
	}
	connectSeconds := time.Since(connectStart).Seconds()
	running := atomic.Bool{}
	running.Store(true)
	ledgers := make([]ledger, clients)
	var readers sync.WaitGroup
	for i, conn := range conns {
		readers.Add(1)
		go func(conn *websocket.Conn, book *ledger) {
			defer readers.Done()
			for {
				_, data, err := conn.ReadMessage()
				if err != nil {
					if running.Load() {
						disconnected.Add(1)
					}
					return
				}
				if n := bytes.Count(data, pubMarker); n > 0 {
					delivered.Add(int64(n))
					lastDelivery.Store(time.Now().UnixNano())
					book.record(data)
				}
				if bytes.Equal(data, []byte("{}")) {
					_ = conn.WriteMessage(websocket.TextMessage, []byte("{}"))
				}
			}
		}(conn, &ledgers[i])
	}

	log.Printf("%d subscribers connected in %.2fs", clients, connectSeconds)
	publisher, err := dial(url)
	if err != nil {
		return nil, err
	}
	if err := handshake(publisher, token, channel+"-publisher"); err != nil {
		return nil, err
	}
	body := strings.Repeat("x", payload-40)
	acks := make(chan struct{}, window)
	gone := make(chan error, 1)
	var published atomic.Int64
	go func() {
		for {
			_, data, err := publisher.ReadMessage()
			if err != nil {
				gone <- err
				return
			}
			for _, line := range bytes.Split(data, []byte("\n")) {
				if bytes.Contains(line, []byte(`"publish"`)) || bytes.Contains(line, []byte(`"error"`)) {
					acks <- struct{}{}
				} else if bytes.Equal(line, []byte("{}")) {
					_ = publisher.WriteMessage(websocket.TextMessage, []byte("{}"))
				}
			}
		}
	}()
	log.Printf("publisher connected")
	start := time.Now()
	deadline := start.Add(duration)
	inFlight := 0
	for id := firstSeq; time.Now().Before(deadline); id++ {
		if inFlight >= window {
			select {
			case <-acks:
			case err := <-gone:
				return nil, fmt.Errorf("the server closed the publisher's connection: %w", err)
			}
			inFlight--
		}
		cmd := fmt.Sprintf(`{"id":%d,"publish":{"channel":%q,"data":{"seq":%d,"text":%q}}}`, id, channel, id, body)
		if err := publisher.WriteMessage(websocket.TextMessage, []byte(cmd)); err != nil {
			return nil, err
		}
		inFlight++
		published.Add(1)
	}
	expected := published.Load() * int64(clients)
	log.Printf("published %d, waiting for %d deliveries", published.Load(), expected)
	drainUntil := time.Now().Add(15 * time.Second)
	for delivered.Load() < expected && time.Now().Before(drainUntil) {
		time.Sleep(10 * time.Millisecond)
	}
	running.Store(false)
	end := time.Unix(0, lastDelivery.Load())
	seconds := end.Sub(start).Seconds()
	for _, conn := range conns {
		conn.Close()
	}
	readers.Wait()
	publisher.Close()
	var lost, duplicated, outOfOrder, hurt int64
	for i := range ledgers {
		book := &ledgers[i]
		missing := published.Load() - book.received(published.Load())
		lost += missing
		duplicated += book.duplicated
		outOfOrder += book.outOfOrder
		if missing > 0 || book.duplicated > 0 || book.outOfOrder > 0 {
			hurt++
		}
	}
	return &result{
		Clients:         clients,
		Published:       published.Load(),
		Delivered:       delivered.Load(),
		Expected:        expected,
		Seconds:         seconds,
		DeliveriesPerS:  float64(delivered.Load()) / seconds,
		PublishesPerS:   float64(published.Load()) / duration.Seconds(),
		ConnectSeconds:  connectSeconds,
		PayloadBytes:    payload,
		DisconnectedMid: disconnected.Load(),
		Lost:            lost,
		Duplicated:      duplicated,
		OutOfOrder:      outOfOrder,
		SubscribersHurt: hurt,
	}, nil
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
