// Package artifacts pulls OCI artifacts, such as Kata Containers guest
// kernels, initrds and configuration files, from a registry into a
// directory, on oras-go.
//
// Each layer lands in a file named by its org.opencontainers.image.title
// annotation. A pull downloads the whole artifact into a staging directory,
// verifies every blob against its digest, syncs it, and makes it current
// with renames: the target path is a symbolic link to a directory named by
// the manifest digest, replaced in one rename, so that readers see the old
// set of files or the new one, never a mix. The resolved digest is recorded
// in the directory (.artifact.json); pulling an unchanged reference costs one
// manifest request and no blob bytes. A failed or interrupted pull leaves the
// previous content in place; its debris is removed by the next pull.
//
// Pulls into the same directory, from one process or several, take turns:
// a pull holds an exclusive flock on the directory's versions directory
// (.<name>.versions) from start to end, and another waits for it, until its
// context ends. Readers take no lock; the link swap is what keeps them safe.
//
// Titles that would leave the directory are refused, before any blob is
// downloaded. Credentials come from a pull secret's .dockerconfigjson and are
// never part of an error. Docker Hub's names (docker.io, index.docker.io,
// registry-1.docker.io and the docker CLI's key https://index.docker.io/v1/)
// all name one registry, as with the docker CLI.
package artifacts
