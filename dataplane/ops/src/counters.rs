//! The `counters!` macro: a struct of relaxed `AtomicU64` counters and its
//! plain snapshot, declared from one list (relay workers, the connector).

/// Declares a struct of relaxed `AtomicU64` counters and its plain
/// snapshot from one list, so exports and reports cannot miss a field.
#[macro_export]
macro_rules! counters {
    ($(#[$sm:meta])* $stats:ident, $snap:ident { $($(#[$m:meta])* $name:ident),* $(,)? }) => {
        $(#[$sm])*
        #[derive(Debug, Default)]
        pub struct $stats { $($(#[$m])* pub $name: ::std::sync::atomic::AtomicU64,)* }

        #[doc = concat!("A plain copy of [`", stringify!($stats), "`].")]
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $snap { $(pub $name: u64,)* }

        impl $stats {
            pub fn snapshot(&self) -> $snap {
                $snap { $($name: self.$name.load(::std::sync::atomic::Ordering::Relaxed),)* }
            }
        }

        impl std::ops::AddAssign for $snap {
            fn add_assign(&mut self, o: Self) { $(self.$name += o.$name;)* }
        }

        impl $snap {
            /// (name, value) pairs, for metrics export and reports.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}
