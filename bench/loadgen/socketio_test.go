package main

import (
	"encoding/json"
	"testing"
)

func TestDecodeSIO(t *testing.T) {
	cases := []struct {
		frame string
		kind  byte
		id    int64
		data  string
	}{
		{`40{"sid":"abc"}`, sioConnect, -1, `{"sid":"abc"}`},
		{`40`, sioConnect, -1, ``},
		{`41`, sioDisconnect, -1, ``},
		{`42["tick",{"seq":10}]`, sioEvent, -1, `["tick",{"seq":10}]`},
		{`4217["emit",{}]`, sioEvent, 17, `["emit",{}]`},
		{`43120[{"offset":3,"epoch":"e"}]`, sioAck, 120, `[{"offset":3,"epoch":"e"}]`},
		{`44{"message":"bad token"}`, sioConnectError, -1, `{"message":"bad token"}`},
		{`42/,7["x"]`, sioEvent, 7, `["x"]`},
	}
	for _, c := range cases {
		p, err := decodeSIO([]byte(c.frame))
		if err != nil {
			t.Fatalf("%s: %v", c.frame, err)
		}
		if p.kind != c.kind || p.id != c.id || string(p.data) != c.data {
			t.Errorf("%s: got kind %c id %d data %s", c.frame, p.kind, p.id, p.data)
		}
	}
}

func TestDecodeSIORefuses(t *testing.T) {
	for _, frame := range []string{``, `2`, `3`, `0{"sid":"x"}`, `4`, `49[]`, `451-["b",{"_placeholder":true,"num":0}]`, `42/admin,["x"]`} {
		if _, err := decodeSIO([]byte(frame)); err == nil {
			t.Errorf("%q decoded", frame)
		}
	}
}

func TestEncodeRoundTrip(t *testing.T) {
	frame := sioEventFrame(42, "emit", json.RawMessage(`{"room":"r","event":"tick","args":[1]}`))
	if string(frame) != `4242["emit",{"room":"r","event":"tick","args":[1]}]` {
		t.Fatalf("encoded %s", frame)
	}
	p, err := decodeSIO(frame)
	if err != nil || p.kind != sioEvent || p.id != 42 {
		t.Fatalf("decoded %+v, %v", p, err)
	}
	var args []json.RawMessage
	if err := json.Unmarshal(p.data, &args); err != nil || len(args) != 2 || string(args[0]) != `"emit"` {
		t.Fatalf("args %s: %v", p.data, err)
	}
	if string(encodeSIO(sioConnect, -1, []byte(`{"token":"t"}`))) != `40{"token":"t"}` {
		t.Fatal("connect packet")
	}
	if string(sioEventFrame(-1, "join", json.RawMessage(`"lobby"`))) != `42["join","lobby"]` {
		t.Fatal("event without ack id")
	}
}

func TestAckError(t *testing.T) {
	if got := ackError([]byte(`[{"error":"no permission"}]`)); got != "no permission" {
		t.Errorf("got %q", got)
	}
	for _, ok := range []string{`[{}]`, `[{"offset":1}]`, `[]`, `[true]`, `not json`} {
		if got := ackError([]byte(ok)); got != "" {
			t.Errorf("%s: got %q", ok, got)
		}
	}
}

func TestSocketIOProtocol(t *testing.T) {
	var proto socketIOProtocol
	if proto.deliveries([]byte(`42["tick",{"seq":10,"w":0,"t":1}]`)) != 1 || proto.deliveries([]byte(`430[{}]`)) != 0 {
		t.Error("deliveries")
	}
	if string(proto.answer([]byte("2"))) != "3" || proto.answer([]byte(`42["2"]`)) != nil {
		t.Error("ping answer")
	}
	// The ledger reads the payload wherever the server put it: our gateway appends an offset
	// argument, python-socketio does not.
	var book ledger
	book.record([]byte(`42["tick",{"seq":11,"w":2,"t":5,"text":"x"},"3|ep|sio:bench"]`), 10)
	book.record([]byte(`42["tick",{"seq":10,"w":2,"t":5,"text":"x"}]`), 10)
	if book.received != 2 || book.outOfOrder != 1 || book.duplicated != 0 {
		t.Errorf("ledger %+v", book)
	}
	if got := sioURL("ws://h/socket.io/"); got != "ws://h/socket.io/?EIO=4&transport=websocket" {
		t.Errorf("url %s", got)
	}
}
