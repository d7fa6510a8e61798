//! The Lua scripts, compiled into the binary so both engines run exactly the shipped text.
//!
//! Each script is `lua/prelude.lua` followed by the script's own file: Redis scripts cannot
//! share functions, so the helpers every script needs are prepended. The SHA-1 is of that
//! combined text, which is what `EVALSHA` names.

use std::sync::LazyLock;

/// One runnable script: the prelude plus a file of `lua/`.
#[derive(Debug)]
pub struct Script {
    name: &'static str,
    source: String,
    sha1: String,
}

impl Script {
    /// A script from `body` with the prelude prepended. The shipped scripts are in
    /// [`SCRIPTS`]; tests use this to run probes through both engines.
    pub fn new(name: &'static str, body: &str) -> Script {
        let source = format!("{PRELUDE}\n{body}");
        let sha1 = sha1_smol::Sha1::from(&source).digest().to_string();
        Script { name, source, sha1 }
    }

    /// The file name without `.lua`, e.g. `"claim"`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The full text sent to the engine.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Lowercase hex SHA-1 of [`Script::source`].
    pub fn sha1(&self) -> &str {
        &self.sha1
    }
}

const PRELUDE: &str = include_str!("../../lua/prelude.lua");

macro_rules! scripts {
    ($($field:ident),* $(,)?) => {
        /// Every script of `lua/`, by name.
        #[derive(Debug)]
        pub struct Scripts {
            $(#[doc = concat!("`lua/", stringify!($field), ".lua`")] pub $field: Script,)*
        }

        impl Scripts {
            fn load() -> Scripts {
                Scripts {
                    $($field: Script::new(
                        stringify!($field),
                        include_str!(concat!("../../lua/", stringify!($field), ".lua")),
                    ),)*
                }
            }

            /// All scripts, e.g. to preload them or to check the commands they use.
            pub fn all(&self) -> Vec<&Script> {
                vec![$(&self.$field),*]
            }
        }
    };
}

scripts!(
    sku,
    add,
    claim,
    claims_batch,
    confirm,
    release,
    expire,
    redeem,
    order,
    counts,
    void,
    restore,
    index,
    window,
    exists,
    stream,
    warm,
    inspect,
    repair,
    orders,
    recode
);

/// The scripts, loaded once.
pub static SCRIPTS: LazyLock<Scripts> = LazyLock::new(Scripts::load);

/// The prelude's own text, for tests that scan every file of `lua/`.
pub fn prelude() -> &'static str {
    PRELUDE
}
