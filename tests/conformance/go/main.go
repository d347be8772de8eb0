// The stock Go SDK (github.com/centrifugal/centrifuge-go) through one scripted session, printing a JSON
// summary that the conformance test compares between Centrifugo and the gateway:
// subscribe with recovery and join/leave, publish, history, presence, a refused subscription, then a
// disconnect, publications made through the server API while away, and a reconnect that recovers them.
//
// Usage: conformance WS_URL API_URL API_KEY TOKEN CHANNEL
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/centrifugal/centrifuge-go"
)

type summary struct {
	Received       []json.RawMessage `json:"received"`
	Offsets        []uint64          `json:"offsets"`
	Subscribed     []subscribed      `json:"subscribed"`
	HistoryOffsets []uint64          `json:"history_offsets"`
	PresenceUsers  int               `json:"presence_users"`
	RefusedCode    uint32            `json:"refused_code"`
	UnknownCode    uint32            `json:"unknown_code"`
}

type subscribed struct {
	Recovered     bool `json:"recovered"`
	WasRecovering bool `json:"was_recovering"`
	Recoverable   bool `json:"recoverable"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func apiPublish(apiURL, apiKey, channel string, n int) {
	body, _ := json.Marshal(map[string]any{"channel": channel, "data": map[string]int{"n": n}})
	request, _ := http.NewRequest(http.MethodPost, apiURL+"/publish", bytes.NewReader(body))
	request.Header.Set("X-API-Key", apiKey)
	response, err := http.DefaultClient.Do(request)
	if err != nil || response.StatusCode != http.StatusOK {
		fail("api publish %d: %v %v", n, err, response)
	}
	response.Body.Close()
}

func main() {
	if len(os.Args) != 6 {
		fail("usage: conformance WS_URL API_URL API_KEY TOKEN CHANNEL")
	}
	wsURL, apiURL, apiKey, token, channel := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var mu sync.Mutex
	out := summary{}
	client := centrifuge.NewJsonClient(wsURL, centrifuge.Config{Token: token})
	defer client.Close()
	sub, err := client.NewSubscription(channel, centrifuge.SubscriptionConfig{Recoverable: true, JoinLeave: true})
	if err != nil {
		fail("new subscription: %v", err)
	}
	ready := make(chan struct{}, 4)
	sub.OnSubscribed(func(e centrifuge.SubscribedEvent) {
		mu.Lock()
		out.Subscribed = append(out.Subscribed, subscribed{e.Recovered, e.WasRecovering, e.Recoverable})
		mu.Unlock()
		ready <- struct{}{}
	})
	sub.OnPublication(func(e centrifuge.PublicationEvent) {
		mu.Lock()
		out.Received = append(out.Received, json.RawMessage(e.Data))
		out.Offsets = append(out.Offsets, e.Offset)
		mu.Unlock()
	})
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(out.Received)
	}
	waitFor := func(n int) {
		for count() < n {
			if ctx.Err() != nil {
				fail("%d publications expected, got %d", n, count())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if err := client.Connect(); err != nil {
		fail("connect: %v", err)
	}
	if err := sub.Subscribe(); err != nil {
		fail("subscribe: %v", err)
	}
	<-ready
	for n := 0; n < 3; n++ {
		if _, err := sub.Publish(ctx, []byte(fmt.Sprintf(`{"n":%d}`, n))); err != nil {
			fail("publish: %v", err)
		}
	}
	waitFor(3)
	history, err := sub.History(ctx, centrifuge.WithHistoryLimit(10))
	if err != nil {
		fail("history: %v", err)
	}
	for _, pub := range history.Publications {
		out.HistoryOffsets = append(out.HistoryOffsets, pub.Offset)
	}
	presence, err := sub.PresenceStats(ctx)
	if err != nil {
		fail("presence stats: %v", err)
	}
	out.PresenceUsers = presence.NumUsers

	refused, _ := client.NewSubscription("secret:plans")
	refusedErr := make(chan error, 1)
	refused.OnError(func(e centrifuge.SubscriptionErrorEvent) { refusedErr <- e.Error })
	refused.OnUnsubscribed(func(e centrifuge.UnsubscribedEvent) { refusedErr <- fmt.Errorf("unsubscribed %d", e.Code) })
	_ = refused.Subscribe()
	select {
	case err := <-refusedErr:
		if e, ok := err.(*centrifuge.Error); ok {
			out.RefusedCode = e.Code
		} else if e, ok := err.(centrifuge.SubscriptionSubscribeError); ok {
			if inner, ok := e.Err.(*centrifuge.Error); ok {
				out.RefusedCode = inner.Code
			}
		}
	case <-ctx.Done():
		fail("the refused subscription got no answer")
	}
	if _, err := client.Publish(ctx, "nowhere:x", []byte(`{}`)); err != nil {
		if e, ok := err.(*centrifuge.Error); ok {
			out.UnknownCode = e.Code
		}
	}

	if err := client.Disconnect(); err != nil {
		fail("disconnect: %v", err)
	}
	for n := 3; n < 5; n++ {
		apiPublish(apiURL, apiKey, channel, n)
	}
	if err := client.Connect(); err != nil {
		fail("reconnect: %v", err)
	}
	waitFor(5)
	mu.Lock()
	defer mu.Unlock()
	encoded, _ := json.Marshal(out)
	fmt.Println(string(encoded))
}
