//! Entry locks where `flock` cannot be trusted: a lock file with an owner and a lease.
//!
//! On NFS, Lustre and similar shared file systems an advisory `flock` may be local to one client,
//! emulated, or refused, so two nodes of a cluster could compute (and publish) one entry at once.
//! There the cache takes [`Lease`]s instead (see the cache module doc for when):
//!
//! - **Acquire**: create `locks/<fp>.lease` exclusively (`O_CREAT|O_EXCL`, atomic on NFSv3 and
//!   later and on Lustre), holding `{owner, expires}`; the owner is host, pid and a random
//!   nonce. A lease that exists and has not expired means "held": wait and retry.
//! - **Renew**: a thread rewrites the expiry every third of the lease while the lock is held, so
//!   a live holder never loses it; a killed one stops renewing and its lease runs out.
//! - **Steal**: an expired lease is renamed aside (one renamer wins; the others see it gone) and
//!   removed if the renamed file is still the expired one; if it is not (another process took
//!   the lock between our read and our rename), it is linked back. Then creation is retried.
//! - **Release**: remove the lease file if it is still ours.
//!
//! Known limits: clocks of the nodes must agree to within the lease's slack ([`SLACK`]); a
//! holder stalled for longer than the lease (a frozen VM) can lose its lock to another node,
//! which is reported when its renewal finds another owner.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Extra time past `expires` before a lease counts as expired (clock differences between nodes).
pub const SLACK: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseFile {
    owner: String,
    /// Milliseconds since the Unix epoch.
    expires_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn host() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".into())
}

/// A held lease; renewed until dropped.
pub struct Lease {
    path: PathBuf,
    owner: String,
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    renewer: Option<std::thread::JoinHandle<()>>,
    /// Set when a renewal found the lease taken over by another owner.
    pub lost: Arc<AtomicBool>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("path", &self.path).finish()
    }
}

fn read(path: &Path) -> Option<LeaseFile> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Whether a lease file is held: it exists and has not expired (an unreadable one counts as
/// held until its modification time is a lease old).
pub fn is_held(path: &Path, lease: Duration) -> bool {
    match read(path) {
        Some(l) => l.expires_ms + SLACK.as_millis() as u64 > now_ms(),
        None => fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < lease + SLACK),
    }
}

/// Write `content` into a new file at `path`, failing if it exists.
fn create_exclusive(path: &Path, content: &LeaseFile) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let bytes = serde_json::to_vec(content).unwrap_or_default();
    f.write_all(&bytes)?;
    f.sync_all()
}

impl Lease {
    /// Take the lease at `path` for `lease` at a time, waiting while another holds it;
    /// `on_wait` is called once if it must wait.
    pub fn acquire(
        path: &Path,
        lease: Duration,
        on_wait: &mut dyn FnMut(),
    ) -> std::io::Result<Lease> {
        let owner = format!("{}:{}:{:016x}", host(), std::process::id(), rand_u64());
        let mut waited = false;
        loop {
            let content = LeaseFile {
                owner: owner.clone(),
                expires_ms: now_ms() + lease.as_millis() as u64,
            };
            match create_exclusive(path, &content) {
                Ok(()) => return Ok(Lease::start(path, owner, lease)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            if is_held(path, lease) {
                if !waited {
                    waited = true;
                    on_wait();
                }
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            steal(path, &owner);
        }
    }

    fn start(path: &Path, owner: String, lease: Duration) -> Lease {
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (path, owner, stop, lost) = (
                path.to_path_buf(),
                owner.clone(),
                stop.clone(),
                lost.clone(),
            );
            std::thread::Builder::new()
                .name("burnish-lease".into())
                .spawn(move || renew(&path, &owner, lease, &stop, &lost))
                .ok()
        };
        Lease {
            path: path.to_path_buf(),
            owner,
            stop,
            renewer,
            lost,
        }
    }
}

/// Rewrite the expiry every third of the lease until told to stop.
fn renew(
    path: &Path,
    owner: &str,
    lease: Duration,
    stop: &(Mutex<bool>, std::sync::Condvar),
    lost: &AtomicBool,
) {
    let (flag, cv) = stop;
    let mut stopped = flag.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let (guard, _) = cv
            .wait_timeout(stopped, lease / 3)
            .unwrap_or_else(|e| e.into_inner());
        stopped = guard;
        if *stopped {
            return;
        }
        match read(path) {
            Some(l) if l.owner == owner => {
                let content = LeaseFile {
                    owner: owner.to_owned(),
                    expires_ms: now_ms() + lease.as_millis() as u64,
                };
                let bytes = serde_json::to_vec(&content).unwrap_or_default();
                let _ = crate::cache::write_atomic(path, &bytes);
            }
            _ => lost.store(true, Ordering::Relaxed),
        }
    }
}

/// Remove an expired lease at `path` so that creation can be retried.
fn steal(path: &Path, me: &str) {
    let Some(seen) = read(path) else {
        // Unreadable and old (a writer killed between create and write): remove it the same way.
        let aside = path.with_extension(format!("stale.{:016x}", rand_u64()));
        if fs::rename(path, &aside).is_ok() {
            let _ = fs::remove_file(&aside);
        }
        return;
    };
    let aside = path.with_extension(format!("stale.{}", me.replace(':', "-")));
    if fs::rename(path, &aside).is_err() {
        return; // another process moved it first
    }
    if read(&aside).as_ref() == Some(&seen) {
        let _ = fs::remove_file(&aside);
    } else {
        // Not the expired lease we read: someone's fresh one. Put it back unless a newer one
        // is already there.
        let _ = fs::hard_link(&aside, path);
        let _ = fs::remove_file(&aside);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (flag, cv) = &*self.stop;
        if let Ok(mut s) = flag.lock() {
            *s = true;
        }
        cv.notify_all();
        if let Some(h) = self.renewer.take() {
            let _ = h.join();
        }
        if read(&self.path).is_some_and(|l| l.owner == self.owner) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The file system type of the mount holding `path`, from `/proc/self/mountinfo` (Linux).
pub fn fs_type(path: &Path) -> Option<String> {
    let path = fs::canonicalize(path).ok()?;
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        // `id parent major:minor root mountpoint options [optional…] - fstype source superopts`
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype)) = (fields.get(4), fields.get(dash + 1)) else {
            continue;
        };
        let mount = mount.replace("\\040", " ");
        if path.starts_with(&mount) && best.as_ref().is_none_or(|(n, _)| mount.len() >= *n) {
            best = Some((mount.len(), (*fstype).to_owned()));
        }
    }
    best.map(|(_, t)| t)
}

/// Whether `flock` on this file system type is not to be trusted across machines.
pub fn needs_lease(fstype: &str) -> bool {
    matches!(
        fstype,
        "nfs" | "nfs4" | "lustre" | "gpfs" | "beegfs" | "cifs" | "smb3" | "glusterfs" | "ceph"
    ) || fstype.starts_with("fuse.")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(600);

    #[test]
    fn one_holder_at_a_time_and_the_waiter_gets_it_on_release() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lease");
        let first = Lease::acquire(&p, SHORT, &mut || panic!("nothing holds it")).unwrap();
        assert!(is_held(&p, SHORT));
        let p2 = p.clone();
        let waiter = std::thread::spawn(move || {
            let mut waited = false;
            let l = Lease::acquire(&p2, SHORT, &mut || waited = true).unwrap();
            (waited, l.owner.clone())
        });
        // Held well past its lease: renewal keeps it.
        std::thread::sleep(SHORT * 3);
        assert!(!waiter.is_finished(), "the lease expired while held");
        assert!(!first.lost.load(Ordering::Relaxed));
        let mine = first.owner.clone();
        drop(first);
        let (waited, owner) = waiter.join().unwrap();
        assert!(waited);
        assert_ne!(owner, mine);
        assert!(!p.exists(), "the second holder released it on drop");
    }

    #[test]
    fn an_expired_lease_of_a_dead_holder_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lease");
        let dead = LeaseFile {
            owner: "elsewhere:1:0".into(),
            expires_ms: now_ms() - SLACK.as_millis() as u64 - 1,
        };
        create_exclusive(&p, &dead).unwrap();
        assert!(!is_held(&p, SHORT));
        let l = Lease::acquire(&p, SHORT, &mut || {}).unwrap();
        assert_eq!(read(&p).unwrap().owner, l.owner);
        // A lease still running is not taken.
        drop(l);
        let alive = LeaseFile {
            owner: "elsewhere:2:0".into(),
            expires_ms: now_ms() + 60_000,
        };
        create_exclusive(&p, &alive).unwrap();
        assert!(is_held(&p, SHORT));
        let p2 = p.clone();
        let waiter = std::thread::spawn(move || Lease::acquire(&p2, SHORT, &mut || {}).map(|_| ()));
        std::thread::sleep(SHORT * 2);
        assert!(!waiter.is_finished(), "a live lease was taken");
        assert_eq!(read(&p), Some(alive));
        fs::remove_file(&p).unwrap();
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn a_renewal_that_finds_another_owner_reports_the_loss() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lease");
        let l = Lease::acquire(&p, SHORT, &mut || {}).unwrap();
        let other = LeaseFile {
            owner: "elsewhere:3:0".into(),
            expires_ms: now_ms() + 60_000,
        };
        crate::cache::write_atomic(&p, &serde_json::to_vec(&other).unwrap()).unwrap();
        std::thread::sleep(SHORT);
        assert!(l.lost.load(Ordering::Relaxed));
        drop(l);
        assert_eq!(
            read(&p),
            Some(other),
            "release leaves another owner's lease alone"
        );
    }

    #[test]
    fn shared_file_systems_are_recognised() {
        for t in ["nfs", "nfs4", "lustre", "fuse.sshfs", "beegfs"] {
            assert!(needs_lease(t), "{t}");
        }
        for t in ["ext4", "xfs", "btrfs", "tmpfs", "overlay"] {
            assert!(!needs_lease(t), "{t}");
        }
        assert!(fs_type(Path::new("/")).is_some());
    }
}
