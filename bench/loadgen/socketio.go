package main

// -proto socketio: Socket.IO v5 over Engine.IO v4, WebSocket transport only, default namespace, text
// packets only. Enough for the broadcast scenario against any Socket.IO server that has the two
// events our gateway's /socket.io/ has: `join` room (ack) and `emit {room, event, args}` (ack).
//
// Engine.IO frames are one packet per WebSocket message: `0{open}`, `2` ping (answered `3`), `4...`
// message. A Socket.IO packet rides in a message: `4` + type + [`/nsp,`] + [ack id] + JSON, e.g.
// `40{"token":"…"}` CONNECT with auth, `42["tick",…]` EVENT, `4217["emit",{…}]` EVENT wanting ack
// 17, `4317[{…}]` its ACK, `44{"message":"…"}` CONNECT_ERROR.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

const (
	eioOpen    = '0'
	eioClose   = '1'
	eioPing    = '2'
	eioPong    = '3'
	eioMessage = '4'

	sioConnect      = '0'
	sioDisconnect   = '1'
	sioEvent        = '2'
	sioAck          = '3'
	sioConnectError = '4'
	sioBinaryEvent  = '5'
	sioBinaryAck    = '6'

	// sioTick is the event every subscriber counts.
	sioTick = "tick"
)

// sioPacket is one Socket.IO packet of the default namespace.
type sioPacket struct {
	kind byte   // sioConnect … sioBinaryAck
	id   int64  // the ack id; -1: none
	data []byte // the JSON after the ack id (may be empty)
}

var errNotMessage = errors.New("not an Engine.IO message")

// decodeSIO reads the Socket.IO packet in one Engine.IO message.
func decodeSIO(frame []byte) (sioPacket, error) {
	if len(frame) < 2 || frame[0] != eioMessage {
		return sioPacket{}, errNotMessage
	}
	p := sioPacket{kind: frame[1], id: -1}
	if p.kind < sioConnect || p.kind > sioBinaryAck {
		return sioPacket{}, fmt.Errorf("unknown Socket.IO packet type %q", p.kind)
	}
	if p.kind == sioBinaryEvent || p.kind == sioBinaryAck {
		return sioPacket{}, errors.New("binary Socket.IO packets are not supported")
	}
	rest := frame[2:]
	if len(rest) > 0 && rest[0] == '/' {
		end := bytes.IndexByte(rest, ',')
		if end < 0 {
			end = len(rest)
		}
		if namespace := string(rest[:end]); namespace != "/" {
			return sioPacket{}, fmt.Errorf("namespace %q: only / is spoken", namespace)
		}
		rest = rest[min(end+1, len(rest)):]
	}
	digits := 0
	for digits < len(rest) && rest[digits] >= '0' && rest[digits] <= '9' {
		digits++
	}
	if digits > 0 {
		id, err := strconv.ParseInt(string(rest[:digits]), 10, 64)
		if err != nil {
			return sioPacket{}, fmt.Errorf("ack id: %w", err)
		}
		p.id = id
	}
	p.data = rest[digits:]
	return p, nil
}

// encodeSIO is the Engine.IO message carrying a Socket.IO packet (id < 0: no ack id).
func encodeSIO(kind byte, id int64, data []byte) []byte {
	frame := make([]byte, 0, 24+len(data))
	frame = append(frame, eioMessage, kind)
	if id >= 0 {
		frame = strconv.AppendInt(frame, id, 10)
	}
	return append(frame, data...)
}

// sioEventFrame is an EVENT packet `[name, args...]` (id < 0: no ack wanted).
func sioEventFrame(id int64, name string, args ...json.RawMessage) []byte {
	data := make([]byte, 0, 64)
	data = append(data, '[')
	data = strconv.AppendQuote(data, name)
	for _, arg := range args {
		data = append(append(data, ','), arg...)
	}
	return encodeSIO(sioEvent, id, append(data, ']'))
}

// ackError is the `error` of an ACK's first argument ({"error": "..."}), or "".
func ackError(data []byte) string {
	var args []map[string]any
	if json.Unmarshal(data, &args) != nil || len(args) == 0 {
		return ""
	}
	if text, ok := args[0]["error"].(string); ok {
		return text
	}
	return ""
}

// sioURL adds Engine.IO's query (`EIO=4&transport=websocket`) to a `ws://host/socket.io/` URL.
func sioURL(raw string) string {
	if strings.Contains(raw, "EIO=") {
		return raw
	}
	if strings.Contains(raw, "?") {
		return raw + "&EIO=4&transport=websocket"
	}
	return raw + "?EIO=4&transport=websocket"
}

type socketIOProtocol struct{}

func (socketIOProtocol) deliveries(msg []byte) int {
	if bytes.HasPrefix(msg, []byte{eioMessage, sioEvent}) {
		return 1
	}
	return 0
}

func (socketIOProtocol) answer(msg []byte) []byte {
	if len(msg) == 1 && msg[0] == eioPing {
		return []byte{eioPong}
	}
	return nil
}

// sioRead is the next Socket.IO packet, answering pings on the way (the caller is the only writer).
func sioRead(conn *websocket.Conn) (sioPacket, error) {
	for {
		_, msg, err := conn.ReadMessage()
		if err != nil {
			return sioPacket{}, err
		}
		switch {
		case len(msg) == 0:
			continue
		case msg[0] == eioPing:
			if err := conn.WriteMessage(websocket.TextMessage, []byte{eioPong}); err != nil {
				return sioPacket{}, err
			}
			continue
		case msg[0] == eioClose:
			return sioPacket{}, errors.New("the server closed the Engine.IO session")
		case msg[0] != eioMessage:
			continue
		}
		return decodeSIO(msg)
	}
}

// dialSocketIO opens an Engine.IO session, connects the default namespace with auth {token} and
// joins `rooms`, each join waiting for its ack.
func dialSocketIO(raw, token string, rooms ...string) (*websocket.Conn, error) {
	conn, err := dial(sioURL(raw))
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*websocket.Conn, error) {
		conn.Close()
		return nil, err
	}
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, open, err := conn.ReadMessage()
	if err != nil {
		return fail(err)
	}
	if len(open) == 0 || open[0] != eioOpen {
		return fail(fmt.Errorf("expected the Engine.IO open packet, got %.80q", open))
	}
	auth, _ := json.Marshal(map[string]string{"token": token})
	if err := conn.WriteMessage(websocket.TextMessage, encodeSIO(sioConnect, -1, auth)); err != nil {
		return fail(err)
	}
	for connected := false; !connected; {
		p, err := sioRead(conn)
		if err != nil {
			return fail(err)
		}
		switch p.kind {
		case sioConnect:
			connected = true
		case sioConnectError:
			return fail(fmt.Errorf("server refused the connection: %s", p.data))
		}
	}
	for i, room := range rooms {
		id := int64(i + 1)
		quoted, _ := json.Marshal(room)
		if err := conn.WriteMessage(websocket.TextMessage, sioEventFrame(id, "join", quoted)); err != nil {
			return fail(err)
		}
		for {
			p, err := sioRead(conn)
			if err != nil {
				return fail(err)
			}
			if p.kind == sioDisconnect {
				return fail(errors.New("the server disconnected the socket while it joined"))
			}
			if p.kind != sioAck || p.id != id {
				continue
			}
			if text := ackError(p.data); text != "" {
				return fail(fmt.Errorf("join %s refused: %s", room, text))
			}
			break
		}
	}
	_ = conn.SetReadDeadline(time.Time{})
	return conn, nil
}

// sioPublisher emits `emit {room, event: tick, args: [payload]}` with an ack id, one socket for all
// workers (the ack id is the sequence number).
type sioPublisher struct {
	conn    *websocket.Conn
	body    string
	mu      sync.Mutex // one writer: the workers' emits and the reader's pongs
	waiting map[int64]chan error
	gone    chan struct{}
	err     error
}

func newSIOPublisher(raw, token, body string) (*sioPublisher, error) {
	conn, err := dialSocketIO(raw, token)
	if err != nil {
		return nil, err
	}
	p := &sioPublisher{conn: conn, body: body, waiting: map[int64]chan error{}, gone: make(chan struct{})}
	go p.read()
	return p, nil
}

func (p *sioPublisher) read() {
	defer close(p.gone)
	for {
		_, msg, err := p.conn.ReadMessage()
		if err != nil {
			p.err = err
			return
		}
		if len(msg) == 1 && msg[0] == eioPing {
			p.mu.Lock()
			_ = p.conn.WriteMessage(websocket.TextMessage, []byte{eioPong})
			p.mu.Unlock()
			continue
		}
		packet, err := decodeSIO(msg)
		if err != nil {
			continue
		}
		if packet.kind == sioDisconnect {
			p.err = errors.New("the server disconnected the publisher")
			return
		}
		if packet.kind != sioAck {
			continue
		}
		p.mu.Lock()
		done := p.waiting[packet.id]
		delete(p.waiting, packet.id)
		p.mu.Unlock()
		if done == nil {
			continue
		}
		if text := ackError(packet.data); text != "" {
			done <- fmt.Errorf("emit refused: %s", text)
		} else {
			done <- nil
		}
	}
}

func (p *sioPublisher) publish(w int, room string, seq int64) error {
	request, _ := json.Marshal(map[string]any{
		"room": room, "event": sioTick, "args": []json.RawMessage{json.RawMessage(payload(seq, w, p.body))},
	})
	done := make(chan error, 1)
	p.mu.Lock()
	p.waiting[seq] = done
	err := p.conn.WriteMessage(websocket.TextMessage, sioEventFrame(seq, "emit", request))
	p.mu.Unlock()
	if err != nil {
		return err
	}
	select {
	case err := <-done:
		return err
	case <-p.gone:
		return fmt.Errorf("the publisher's socket closed: %v", p.err)
	}
}

func (p *sioPublisher) batch(rooms []string, seqs []int64, workers []int) error {
	for i, room := range rooms {
		if err := p.publish(workers[i], room, seqs[i]); err != nil {
			return err
		}
	}
	return nil
}

func (p *sioPublisher) close() { p.conn.Close() }
