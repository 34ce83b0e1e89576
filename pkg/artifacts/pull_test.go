package artifacts_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"oras.land/oras-go/v2/content"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/artifacts"
)

// A tag is pulled again and again as it moves, the way kata-manager
// reconciles: each step pushes (or not), pulls, and checks the directory,
// the requests the registry saw, and the versions kept on disk.
func TestPull(t *testing.T) {
	reg := startRegistry(t)
	ref := reg.host + "/kata:v1"
	dir := filepath.Join(t.TempDir(), "kata-qemu-nvidia-gpu")
	opts := artifacts.Options{PlainHTTP: true, Retries: -1}
	v1, v2, v3 := kataFiles(1), kataFiles(2), kataFiles(3)

	var tagged digest.Digest // what the tag names now
	var kept []digest.Digest // the versions on disk: current, previous
	for _, step := range []struct {
		name         string
		push         testFiles // pushed to the tag before the pull; nil: the tag stays
		corrupt      bool      // the registry flips a byte of every blob it sends
		wantErr      error
		want         testFiles // the directory's files after the pull
		wantChanged  bool
		wantBlobGets int // each blob once; -1: not counted
	}{
		{name: "cold pull", push: v1, want: v1, wantChanged: true, wantBlobGets: 3},
		{name: "unchanged: one manifest request, no blob", want: v1, wantBlobGets: 0},
		{name: "moved tag", push: v2, want: v2, wantChanged: true, wantBlobGets: 3},
		{name: "corrupted blob refused, previous content kept", push: v3, corrupt: true,
			wantErr: content.ErrMismatchedDigest, want: v2, wantBlobGets: -1},
		{name: "whole again", want: v3, wantChanged: true, wantBlobGets: 3},
	} {
		if !t.Run(step.name, func(t *testing.T) {
			if step.push != nil {
				tagged = push(t, reg.host, "kata", "v1", step.push).Digest
			}
			reg.setCorrupt(step.corrupt)
			defer reg.setCorrupt(false)
			reg.setStep(step.name)
			reg.served() // not the push's
			stepOpts := opts
			stepOpts.Transport = stepTransport{step: step.name}

			res, err := artifacts.Pull(context.Background(), ref, dir, stepOpts)
			requests := reg.served()
			if step.wantErr != nil {
				if !errors.Is(err, step.wantErr) {
					t.Fatalf("pull: got %v, want %v", err, step.wantErr)
				}
				if !strings.Contains(err.Error(), ref) {
					t.Errorf("error %q does not name %s", err, ref)
				}
				res = nil
			} else {
				if err != nil {
					t.Fatal(err)
				}
				if res.Changed != step.wantChanged || res.Digest != tagged {
					t.Errorf("pull: changed %v digest %s, want changed %v digest %s", res.Changed, res.Digest, step.wantChanged, tagged)
				}
				if res.Changed {
					kept = append([]digest.Digest{res.Digest}, kept...)[:min(len(kept)+1, 2)]
				}
			}

			var blobs []string
			for _, r := range requests {
				if strings.HasPrefix(r, "GET ") && strings.Contains(r, "/blobs/") {
					blobs = append(blobs, r)
				}
			}
			if step.wantBlobGets >= 0 && (len(blobs) != step.wantBlobGets || len(slices.Compact(slices.Sorted(slices.Values(blobs)))) != len(blobs)) {
				t.Errorf("blob requests %q, want each of %d blobs once", blobs, step.wantBlobGets)
			}
			if !step.wantChanged && step.wantErr == nil &&
				(len(requests) != 1 || !strings.HasPrefix(requests[0], "HEAD ") || !strings.Contains(requests[0], "/manifests/")) {
				t.Errorf("an unchanged pull made requests %q, want one manifest HEAD", requests)
			}

			checkDir(t, dir, step.want, res)
			versions, junk := versionsDir(t, dir)
			if len(junk) > 0 {
				t.Errorf("debris left: %q", junk)
			}
			var want []string
			for _, d := range kept {
				want = append(want, d.Encoded())
			}
			slices.Sort(want)
			if !slices.Equal(versions, want) {
				t.Errorf("versions kept %q, want the current and the previous %q", versions, want)
			}
		}) {
			return // the steps build on each other
		}
	}
}

// Two pulls into one directory take turns: the second starts while the
// first has its staging directory full, and neither loses its work to the
// other's cleanup. Guards the race in which the second pull's clean removed
// the first's staging directory.
func TestPullConcurrentSameDir(t *testing.T) {
	reg := startRegistry(t)
	files := kataFiles(1)
	push(t, reg.host, "kata", "v1", files)
	ref := reg.host + "/kata:v1"
	dir := filepath.Join(t.TempDir(), "kata")
	ctx := context.Background()
	opts := artifacts.Options{PlainHTTP: true, Retries: -1}

	type outcome struct {
		res *artifacts.Result
		err error
	}
	second := make(chan outcome, 1)
	first := opts
	first.Prepare = func(string, string, []artifacts.File) error {
		// The second pull cleans up before its first request: once the
		// registry sees that request, a pull that took no lock has
		// removed this staging directory. One that waits for the lock
		// never gets there; a quarter second is ample for one that does
		// not wait, which takes milliseconds.
		reached := make(chan struct{})
		var once sync.Once
		reg.setOnServe(func(*http.Request) { once.Do(func() { close(reached) }) })
		defer reg.setOnServe(nil)
		go func() {
			res, err := artifacts.Pull(ctx, ref, dir, opts)
			second <- outcome{res, err}
		}()
		select {
		case <-reached:
		case <-time.After(250 * time.Millisecond):
		}
		return nil
	}
	res, err := artifacts.Pull(ctx, ref, dir, first)
	if err != nil {
		t.Fatalf("first pull: %v", err)
	}
	o := <-second
	if o.err != nil {
		t.Fatalf("second pull: %v", o.err)
	}
	if !res.Changed || o.res.Changed || o.res.Digest != res.Digest {
		t.Errorf("first changed %v (%s), second changed %v (%s): want the second to find the first's version",
			res.Changed, res.Digest, o.res.Changed, o.res.Digest)
	}
	checkDir(t, dir, files, res)
	if versions, junk := versionsDir(t, dir); len(versions) != 1 || len(junk) > 0 {
		t.Errorf("versions %q and debris %q, want one version and no debris", versions, junk)
	}
}

// A pull that waits for another gives up when its context ends, before it
// touches anything.
func TestPullWaitEndsWithContext(t *testing.T) {
	reg := startRegistry(t)
	files := kataFiles(1)
	push(t, reg.host, "kata", "v1", files)
	ref := reg.host + "/kata:v1"
	dir := filepath.Join(t.TempDir(), "kata")
	opts := artifacts.Options{PlainHTTP: true, Retries: -1}

	var waitErr error
	var waitRequests []string
	first := opts
	first.Prepare = func(string, string, []artifacts.File) error {
		reg.served()
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		_, waitErr = artifacts.Pull(ctx, ref, dir, opts)
		waitRequests = reg.served()
		return nil
	}
	res, err := artifacts.Pull(context.Background(), ref, dir, first)
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(waitErr, context.DeadlineExceeded) || !strings.Contains(waitErr.Error(), dir) {
		t.Errorf("waiting pull: got %v, want a deadline error naming %s", waitErr, dir)
	}
	if len(waitRequests) > 0 {
		t.Errorf("the waiting pull sent %q", waitRequests)
	}
	checkDir(t, dir, files, res)
}

// versionsDir lists dir's versions directory: the version directories, and
// the debris (staging directories, links) pulls left.
func versionsDir(t *testing.T, dir string) (versions, debris []string) {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(filepath.Dir(dir), "."+filepath.Base(dir)+".versions"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			debris = append(debris, e.Name())
		} else {
			versions = append(versions, e.Name())
		}
	}
	return versions, debris
}
