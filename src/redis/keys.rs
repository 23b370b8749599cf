//! Every key and channel name the nodes share, built in one place. What each holds is
//! the key table of `docs/several-nodes.md`.

/// The names under one prefix.
#[derive(Debug)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// `{prefix}:signals`: the pub/sub channel of cancellations and decisions.
    pub(super) fn signals(&self) -> String {
        format!("{}:signals", self.prefix)
    }

    /// `{prefix}:global:slots`: the cluster's leases.
    pub(super) fn global_slots(&self) -> String {
        format!("{}:global:slots", self.prefix)
    }

    /// `{prefix}:runlog:epoch`: the run logs' shared epoch.
    pub(super) fn epoch(&self) -> String {
        format!("{}:runlog:epoch", self.prefix)
    }

    /// `{prefix}:node:<node>:wake`: ends a node's blocking read early.
    pub(super) fn wake(&self, node: &str) -> String {
        format!("{}:node:{node}:wake", self.prefix)
    }

    /// `{prefix}:u{<user>}:rate`: the user's bucket.
    pub(super) fn rate(&self, user: &str) -> String {
        self.user(user, &["rate"])
    }

    /// `{prefix}:u{<user>}:slots`: the user's leases.
    pub(super) fn slots(&self, user: &str) -> String {
        self.user(user, &["slots"])
    }

    /// `{prefix}:u{<user>}:approval:<call>`: where the call waits for approval.
    pub(super) fn approval(&self, user: &str, call: &str) -> String {
        self.user(user, &["approval:", call])
    }

    /// `{prefix}:u{<user>}:run:<run>`: the run's stream.
    pub(super) fn run(&self, user: &str, run: &str) -> String {
        self.user(user, &["run:", run])
    }

    /// `{prefix}:u{<user>}:run:`, the run's stream without the run id (for the
    /// append script, which deletes the user's oldest runs).
    pub(super) fn runs_of(&self, user: &str) -> String {
        self.user(user, &["run:"])
    }

    /// `{prefix}:u{<user>}:runs`: the user's runs by last append.
    pub(super) fn runs(&self, user: &str) -> String {
        self.user(user, &["runs"])
    }

    /// `{prefix}:u{<user>}:seen:<run>`: the node that follows the run.
    pub(super) fn seen(&self, user: &str, run: &str) -> String {
        self.user(user, &["seen:", run])
    }

    /// `{prefix}:u{<user>}:<what>`, with `%`, `{` and `}` escaped in the user id so
    /// that the braces delimit the Redis Cluster hash tag (one user's keys on one
    /// slot) and two ids never share a key.
    fn user(&self, user: &str, what: &[&str]) -> String {
        let tail: usize = what.iter().map(|w| w.len()).sum();
        let mut key = String::with_capacity(self.prefix.len() + user.len() + tail + 6);
        key.push_str(&self.prefix);
        key.push_str(":u{");
        for c in user.chars() {
            match c {
                '%' => key.push_str("%25"),
                '{' => key.push_str("%7B"),
                '}' => key.push_str("%7D"),
                c => key.push(c),
            }
        }
        key.push_str("}:");
        for w in what {
            key.push_str(w);
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_escaped_into_one_hash_tag_and_never_collide() {
        let k = Keys::new("p");
        assert_eq!(k.rate("alice"), "p:u{alice}:rate");
        assert_eq!(k.rate("a}b{c%"), "p:u{a%7Db%7Bc%25}:rate");
        assert_ne!(k.rate("%7D"), k.rate("}"));
        assert_eq!(k.run("a", "r"), format!("{}r", k.runs_of("a")));
        assert_eq!(k.approval("a", "c"), "p:u{a}:approval:c");
        assert_eq!(k.seen("a", "r"), "p:u{a}:seen:r");
        assert_eq!(k.wake("n"), "p:node:n:wake");
    }
}
