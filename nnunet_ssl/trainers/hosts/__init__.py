"""Hosts: where the reference prediction comes from (EMA teacher, weak view of the same network, a second
network). Each is a subclass of ``nnUNetTrainerSSL`` with the method's own default loss."""
